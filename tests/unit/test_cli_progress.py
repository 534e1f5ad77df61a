"""Long commands show progress on stderr (the result stays on stdout)."""
from dsv4rt.cli import main


def test_bench_dispatch_shows_progress(capsys):
    assert main(["bench", "--dispatch", "--quick"]) == 0
    out, err = capsys.readouterr()
    assert "| moe_combine |" in out and "6/6 series" in err, err
