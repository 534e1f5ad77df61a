"""Hostile ``dsv4rt serve`` pool sizes: a non-finite, non-positive or larger-than-memory ``--kv-cache-gib``
is a one-line usage error with exit code 2 naming the flag, before any pool is allocated (inf raised
OverflowError and 1e9 a RuntimeError from the allocator, both as tracebacks, before)."""
from __future__ import annotations

import pytest
import torch

from dsv4rt.cli import main
from dsv4rt.model.kvpool import device_memory


@pytest.mark.parametrize("gib", ["inf", "-inf", "nan", "1e400", "0", "-1"])
def test_kv_cache_gib_must_be_finite_and_positive(capsys, gib):
    assert main(["serve", "--preset", "tiny", f"--kv-cache-gib={gib}", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kv-cache-gib must be a finite number > 0" in err[0], err


@pytest.mark.parametrize("extra", [[], ["--max-seq-len", "512"]])
def test_kv_cache_gib_beyond_memory_is_refused(capsys, extra):
    memory = device_memory(torch.device("cpu"))
    if memory is None:
        pytest.skip("this platform does not report its memory (os.sysconf)")
    gib = f"{2 * memory / 2 ** 30 + 1:g}"
    for g in (gib, "1e9"):
        assert main(["serve", "--preset", "tiny", "--backend", "cpu", f"--kv-cache-gib={g}", "--port", "0",
                     *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--kv-cache-gib {float(g):g} asks for a pool larger than the memory" in err[0], err
