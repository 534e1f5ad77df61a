"""A backend's declared offers (shown by `dsv4rt info --matrix` where it cannot load) match what it registers."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dsv4rt.registry import REGISTRY

CHECK = r"""
import sys
from dsv4rt.registry import REGISTRY
name = sys.argv[1]
offers = REGISTRY.backends()[name].offers()
registered = {(i.op, i.variant) for i in REGISTRY.load(name)}
declared = {(op, v) for op, vs in offers.items() for v in vs}
extra = registered - declared
print("EXTRA" if extra else "OK", sorted(extra))
"""


@pytest.mark.parametrize("name", [n for n in REGISTRY.backends() if REGISTRY.probe(n).available])
def test_loaded_backends_register_only_what_they_offer(name):
    offers = REGISTRY.backends()[name].offers()
    if not offers:
        pytest.skip(f"backend {name!r} declares no offers")
    registered = {(i.op, i.variant) for i in REGISTRY.load(name)}
    declared = {(op, v) for op, vs in offers.items() for v in vs}
    assert registered <= declared, f"{name} registers undeclared variants {sorted(registered - declared)}"


def test_cuda_offers_match_under_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed: the cuda backend cannot load here")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSV4RT_", "TRITON_"))}
    env["DSV4RT_TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", CHECK, "cuda"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK"), out.stdout
