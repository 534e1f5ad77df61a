"""engram_hash and engram_lookup on every CPU variant (and cuda/triton under Triton's interpreter, in a child
process) against the reference, plus the property the lookup exists for: a huge memory-mapped table is read
only at the requested rows (a 16 GiB sparse file; the resident set must stay small)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dsv4rt.reference as ref
from dsv4rt import ops
from dsv4rt.backend import poisoned_outputs
from dsv4rt.conformance import tolerance as tol
from dsv4rt.engram_tables import engram_tables
from dsv4rt.errors import ContractError

CPU = ["cpu/native", "cpu/numpy", "cpu/torch"]


def _variant_ok(variant: str) -> None:
    if variant == "cpu/native":
        from dsv4rt.backends.cpu import native_status

        if not native_status()[0]:
            pytest.skip("dsv4rt._C is not built here")


def _table(g: torch.Generator, rows: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randint(0, 256, (rows, d), generator=g, dtype=torch.int32).to(torch.uint8)
    w[(w & 0x7F) == 0x7F] = 0x38
    s = torch.randint(110, 140, (rows, d // 32), generator=g, dtype=torch.int32).to(torch.uint8)
    return w.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu)


@pytest.mark.parametrize("variant", CPU)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_lookup_matches_the_reference(variant, out_dtype):
    _variant_ok(variant)
    g = torch.Generator().manual_seed(3)
    w, s = _table(g, 1000, 256)
    ids = torch.randint(0, 1000, (33, 24), generator=g)
    with poisoned_outputs():
        out = ops.engram_lookup(ids, w, s, out_dtype, backend=variant)
    args = {"ids": ids, "weight": w, "scale": s, "out_dtype": out_dtype}
    check = tol.lookup("engram_lookup", args, (out,), (ref.engram_lookup(**args),))
    assert check.passed, check.message
    # and the value itself, decoded by hand for one element
    b, e = int(w.view(torch.uint8)[ids[5, 7], 40]), int(s.view(torch.uint8)[ids[5, 7], 1])
    ex, man = (b >> 3) & 15, b & 7
    val = (man * 2.0**-9 if ex == 0 else (1 + man / 8) * 2.0 ** (ex - 7)) * (-1 if b & 0x80 else 1) * 2.0 ** (e - 127)
    assert float(out[5, 7, 40]) == float(torch.tensor(val).to(out_dtype))


@pytest.mark.parametrize("variant", CPU)
def test_hash_matches_the_reference_on_released_tables(variant):
    _variant_ok(variant)
    tab = engram_tables([1, 14], 4, 8, 16_000_000, 99_092)[0]
    g = torch.Generator().manual_seed(1)
    window = torch.randint(0, 99_092, (200, 4), generator=g)
    window[torch.rand(200, 4, generator=g) < 0.15] = -1
    with poisoned_outputs():
        rows = ops.engram_hash(window, tab.multipliers, tab.primes, tab.offsets, 5, backend=variant)
    assert torch.equal(rows, ref.engram_hash(window, tab.multipliers, tab.primes, tab.offsets, 5))
    # every id lands in its own (n, head) bucket range
    lo, hi = tab.offsets, tab.offsets + tab.primes.reshape(-1)
    assert bool(((rows >= lo) & (rows < hi)).all())


def test_a_wrong_hash_or_lookup_fails_the_tolerance():
    """The conformance checks can fail: an off-by-one row id and a one-ulp output are both caught."""
    tab = engram_tables([1], 4, 8, 16_000_000, 99_092)[0]
    window = torch.randint(0, 99_092, (8, 4))
    args = {"window": window, "multipliers": tab.multipliers, "primes": tab.primes, "offsets": tab.offsets,
            "pad_id": 3}
    want = ref.engram_hash(**args)
    bad = want.clone()
    bad[2, 5] += 1
    assert tol.hash_rows("engram_hash", args, (want,), (want,)).passed
    assert not tol.hash_rows("engram_hash", args, (bad,), (want,)).passed
    w, s = _table(torch.Generator().manual_seed(0), 20, 64)
    largs = {"ids": torch.tensor([[1, 2]]), "weight": w, "scale": s, "out_dtype": torch.float32}
    r = ref.engram_lookup(**largs)
    out = r.float()
    out[0, 1, 3] = torch.nextafter(out[0, 1, 3], torch.tensor(float("inf")))
    assert not tol.lookup("engram_lookup", largs, (out,), (r,)).passed


@pytest.mark.parametrize("variant", CPU)
def test_out_of_range_ids_are_a_contract_error(variant):
    _variant_ok(variant)
    w, s = _table(torch.Generator().manual_seed(0), 10, 32)
    for bad in (10, -1):
        with pytest.raises(ContractError, match="'ids'"):
            ops.engram_lookup(torch.tensor([[0, bad]]), w, s, backend=variant)


def test_raw_native_kernels_refuse_what_would_crash():
    """The C++ entry points check what would fault (a zero modulus, a row past the table) themselves."""
    try:
        from dsv4rt import _C
    except ImportError:
        pytest.skip("dsv4rt._C is not built here")
    if not hasattr(_C, "engram_hash"):
        pytest.skip("this dsv4rt._C build predates the Engram kernels")
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    with pytest.raises(ValueError, match="primes"):
        _C.engram_hash(np.zeros((2, 2), np.int64), i64(3, 5), np.zeros((1, 1), np.int64), i64(0), 0,
                       np.empty((2, 1), np.int64))
    with pytest.raises(ValueError, match="ids"):
        _C.engram_lookup(np.array([[7]], np.int64), np.zeros((4, 32), np.uint8), np.zeros((4, 1), np.uint8),
                         np.empty((1, 1, 32), np.float32))


_BIG = textwrap.dedent("""
    import os, sys, tempfile, warnings
    import numpy as np, torch, dsv4rt
    import dsv4rt.reference as ref

    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) * 1024

    rows, d = 1 << 26, 256                       # 16 GiB of E4M3 + 512 MiB of scales, sparse on disk
    with tempfile.TemporaryDirectory() as tmp:
        wpath, spath = os.path.join(tmp, "w.bin"), os.path.join(tmp, "s.bin")
        for path, size in ((wpath, rows * d), (spath, rows * d // 32)):
            with open(path, "wb") as f:
                f.truncate(size)
        rng = np.random.default_rng(0)
        ids = np.concatenate([[0, rows - 1, 1, rows - 2], rng.integers(0, rows, 92)]).reshape(4, 24)
        wm = np.memmap(wpath, np.uint8, "r+", shape=(rows, d))
        sm = np.memmap(spath, np.uint8, "r+", shape=(rows, d // 32))
        for r in np.unique(ids):                  # real data in the requested rows only
            wm[r] = rng.integers(0, 256, d).astype(np.uint8) & 0x77
            sm[r] = rng.integers(120, 135, d // 32).astype(np.uint8)
        wm.flush(); sm.flush()
        del wm, sm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # torch warns that a read-only array is not writable
            w = torch.from_numpy(np.memmap(wpath, np.uint8, "r", shape=(rows, d))).view(torch.float8_e4m3fn)
            s = torch.from_numpy(np.memmap(spath, np.uint8, "r", shape=(rows, d // 32))).view(torch.float8_e8m0fnu)
        idx = torch.from_numpy(ids)
        small_w, small_s = torch.zeros(8, d, dtype=torch.uint8), torch.full((8, d // 32), 127, dtype=torch.uint8)
        dsv4rt.ops.engram_lookup(idx % 8, small_w, small_s, backend=sys.argv[1])   # imports, kernel set-up
        before = rss()
        out = dsv4rt.ops.engram_lookup(idx, w, s, backend=sys.argv[1])
        grew = rss() - before
        want = ref.engram_lookup(idx, w, s).to(torch.bfloat16)
        assert torch.equal(out.view(torch.int16), want.view(torch.int16)), "values differ"
        assert grew < 64 << 20, f"resident set grew by {grew / 2**20:.0f} MiB"
        print("ok", grew)
""")


@pytest.mark.parametrize("variant", CPU + ["cuda/triton"])
def test_lookup_on_a_huge_memory_mapped_table_reads_only_the_requested_rows(variant):
    if variant == "cpu/native":
        _variant_ok(variant)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSV4RT_", "TRITON_"))}
    if variant == "cuda/triton":
        pytest.importorskip("triton", reason="the cuda/triton case runs Triton's interpreter")
        env["DSV4RT_TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", _BIG, variant], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr[-2000:]
