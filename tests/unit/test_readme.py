"""Every ```python block of the README runs on CPU, except those marked <!-- not run: reason -->."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks():
    text = README.read_text(encoding="utf-8")
    out = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("code"))
        out.append(pytest.param(m.group("code"), m.group("why"), id=f"README.md:{line}"))
    return out


def test_the_readme_has_runnable_python_blocks():
    assert sum(1 for p in _blocks() if p.values[1] is None) >= 2


@pytest.mark.parametrize("code,why", _blocks())
def test_readme_python_block_runs(code, why):
    if why is not None:
        pytest.skip(f"marked in the README: {why}")
    exec(compile(code, str(README), "exec"), {"__name__": "readme_block"})
