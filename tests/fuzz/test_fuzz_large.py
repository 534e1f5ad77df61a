"""Shapes whose element counts overflow 32-bit index maths, without allocating them: a KV cache of
2^31 + 512 elements as an overlapping strided view over 128 MiB (rows at the far end selected), and
meta tensors of 2^40 elements. Every variant gives the reference result, or declines with a reason so
the automatic choice falls to one that can (cpu/native would copy the whole view: 8 GiB), or refuses
cleanly; the child runs under an 8 GiB address-space limit, so a hidden full copy fails the case."""
from __future__ import annotations

import pytest

from _child import run_cases

SETUP = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
import dsv4rt.reference as R
g = torch.Generator().manual_seed(0)
N, D, H = (1 << 25) + 8, 64, 4
store = torch.randn(N + D, generator=g)
kv = store.as_strided((1, N, D), (0, 1, 1))            # row n = store[n:n+D]: N*D > 2^31, 128 MiB stored
idx = torch.tensor([[[0, N - 1, N - 2, 7, -1], [N - 1, 5, (1 << 24) + 3, -1, -1]]], dtype=torch.int32)
q = torch.randn(1, 2, H, D, generator=g)
sink = torch.randn(H, generator=g)
rows = idx.clamp(min=0).long().unique()
small = kv[0, rows].unsqueeze(0).contiguous()
remap = torch.searchsorted(rows, idx.clamp(min=0).long()).to(torch.int32)
want = R.sparse_attention(q, small, torch.where(idx >= 0, remap, idx), sink, 0.125)
"""
EXPLICIT = SETUP + """
try:
    o = dsv4rt.ops.sparse_attention(q, kv, idx, sink, 0.125, backend=V)
except dsv4rt.errors.NoImplementationError as e:
    assert "non-contiguous view" in str(e), e
else:
    assert (o.double() - want).abs().max() < 1e-5, (o.double() - want).abs().max()
"""
AUTO = SETUP + """
o = dsv4rt.ops.sparse_attention(q, kv, idx, sink, 0.125)
assert (o.double() - want).abs().max() < 1e-5
"""
META = """
big = 1 << 20
x = torch.empty(big, big, device="meta")
w = torch.empty(8, big // 2, dtype=torch.uint8, device="meta")
s = torch.empty(8, big // 32, dtype=torch.uint8, device="meta")
for call in (lambda: dsv4rt.ops.fp4_gemm(x, w, s),
             lambda: dsv4rt.ops.sparse_attention(torch.empty(1, big, 4, 64, device="meta"),
                                                 torch.empty(1, big * 4, 64, device="meta"),
                                                 torch.empty(1, big, 8, dtype=torch.int32, device="meta"), None, .1),
             lambda: dsv4rt.ops.moe_dispatch(x, torch.empty(big, 8, dtype=torch.int32, device="meta"), 256)):
    try:
        call()
    except dsv4rt.errors.Dsv4rtError as e:
        assert "meta" in str(e), e
    else:
        raise AssertionError("an op ran on meta tensors")
"""


def test_index_maths_beyond_int32():
    cases = {f"kv-2^31-view @ {v}": (v, EXPLICIT) for v in ("cpu/native", "cpu/numpy", "cpu/torch")}
    cases["kv-2^31-view @ auto"] = ("auto", AUTO)
    cases["meta-2^40 @ auto"] = ("auto", META)
    res = run_cases(cases)
    bad = [f"{k}: {r}" for k, r in res.items() if r != "ok"]
    assert not bad, "\n".join(bad)


def test_triton_index_maths_beyond_int32():
    pytest.importorskip("triton", reason="Triton is not installed: the cuda/triton case needs its interpreter")
    res = run_cases({"kv-2^31-view @ cuda/triton": ("cuda/triton", EXPLICIT)}, env={"DSV4RT_TRITON_INTERPRET": "1"})
    assert res == {"kv-2^31-view @ cuda/triton": "ok"}, res
