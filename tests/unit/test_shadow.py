"""A clone folder named dsv4rt shadows the editable install when run from its parent: detected, explained."""
import os
import subprocess
import sys

from dsv4rt.cli import main
from dsv4rt.shadow import shadowing_folders, shadowing_warning


def test_a_folder_named_dsv4rt_without_init_is_found(tmp_path):
    assert shadowing_folders(str(tmp_path), []) == []
    (tmp_path / "dsv4rt" / "runtime").mkdir(parents=True)
    assert shadowing_folders(str(tmp_path), []) == [str(tmp_path / "dsv4rt")]
    text = shadowing_warning(str(tmp_path), [])
    assert "namespace package" in text and "Fix:" in text and "dsv4rt-src" in text


def test_a_real_package_folder_is_not_reported(tmp_path):
    (tmp_path / "dsv4rt").mkdir()
    (tmp_path / "dsv4rt" / "__init__.py").write_text("")
    assert shadowing_folders(str(tmp_path), []) == []


def test_the_cli_warns_from_the_parent_of_such_a_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "dsv4rt").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["kv-cache", "--preset", "tiny", "--context", "128"]) == 0
    assert "empty namespace package" in capsys.readouterr().err


def test_the_shadowing_is_real_for_python_dash_m(tmp_path):
    """The failure the warning describes: without the folder, -m dsv4rt works from the same place."""
    (tmp_path / "dsv4rt").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    bad = subprocess.run([sys.executable, "-c", "import dsv4rt; dsv4rt.__version__"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    (tmp_path / "dsv4rt").rmdir()
    good = subprocess.run([sys.executable, "-c", "import dsv4rt; print(dsv4rt.__version__)"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert bad.returncode != 0 and "__version__" in bad.stderr


def test_python_dash_m_warns_and_stops_without_a_traceback(tmp_path):
    """`python -m dsv4rt` from the parent of such a folder: the warning with the fix, exit 2, no ImportError trace."""
    (tmp_path / "dsv4rt").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-m", "dsv4rt", "--version"], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "empty namespace package" in p.stderr and "Fix:" in p.stderr and "Traceback" not in p.stderr
