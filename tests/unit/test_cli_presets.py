"""`--preset` takes one set of names in every command; a name a command cannot use says what to do instead."""
import pytest

from dsv4rt.cli import main
from dsv4rt.model.config import PRESETS
from dsv4rt.presets_cli import ALL, RELEASED, SYNTHETIC


def test_the_names_are_the_model_presets():
    assert set(ALL) == set(PRESETS) and not set(RELEASED) & set(SYNTHETIC)


@pytest.mark.parametrize("command", [["run"], ["serve"], ["loadtest"], ["synth", "--out", "unused"]])
@pytest.mark.parametrize("name", list(RELEASED))
def test_a_released_name_points_to_checkpoint_and_slice(command, name, capsys):
    assert main([*command[:1], "--preset", name, *command[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dsv4rt {command[0]}: error: --preset {name} is the released"), err
    assert "--checkpoint DIR" in err and f"--preset {RELEASED[name][1]}" in err
    assert "usage:" not in err and len(err.strip().splitlines()) == 1


def test_an_unknown_name_lists_the_valid_ones(capsys):
    assert main(["run", "--preset", "tinyy"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'tinyy'" in err and all(n in err for n in SYNTHETIC) and "usage:" not in err


@pytest.mark.parametrize("name", list(RELEASED) + ["tiny"])
def test_kv_cache_takes_released_and_synthetic_names(name, capsys):
    assert main(["kv-cache", "--preset", name, "--context", "4096"]) == 0
    assert "KV cache per sequence" in capsys.readouterr().out


def test_a_missing_checkpoint_says_it_does_not_exist(tmp_path, capsys):
    assert main(["run", "--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing: does not exist" in err and "config.json" in err
    (tmp_path / "file").write_text("x")
    assert main(["run", "--checkpoint", str(tmp_path / "file")]) == 2
    assert "is a file, not a checkpoint directory" in capsys.readouterr().err



def test_bench_model_takes_the_same_names_and_repeats(capsys):
    from dsv4rt.cli import build_parser

    assert build_parser().parse_args(["bench", "--model", "tiny", "--model", "flash-slice"]).model == \
        ["tiny", "flash-slice"]
    assert main(["bench", "--model", "flash"]) == 2
    err = capsys.readouterr().err
    assert "--model flash is the released" in err and "--model flash-slice" in err and "usage:" not in err
