"""Every ```python block of the README and of the docs pages it moved its detail to runs on CPU, except those
marked <!-- not run: reason -->."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README] + [ROOT / "docs" / f"{name}.md" for name in (
    "backends", "model", "v41", "serving", "multi-device", "plugins", "reliability", "measured-cpu", "ascend-backend")]
_BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks(pages=PAGES):
    out = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for m in _BLOCK.finditer(text):
            line = text.count("\n", 0, m.start("code"))
            out.append(pytest.param(m.group("code"), m.group("why"), id=f"{page.relative_to(ROOT)}:{line}"))
    return out


def test_the_readme_has_runnable_python_blocks():
    assert sum(1 for p in _blocks([README]) if p.values[1] is None) >= 2


@pytest.mark.parametrize("code,why", _blocks())
def test_readme_python_block_runs(code, why):
    if why is not None:
        pytest.skip(f"marked in the page: {why}")
    exec(compile(code, "readme_block", "exec"), {"__name__": "readme_block"})
