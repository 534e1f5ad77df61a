"""The mHC split's glue: the Sinkhorn normalisation on the CPU (NumPy, in place) gives the very bits of the
step-by-step torch loop, and the fused scale / bias gives those of the per-group one, for any number of rows."""
from __future__ import annotations

import pytest
import torch

from dsv4rt import invariant
from dsv4rt.invariant import pointwise
from dsv4rt.model.mhc import HcParams, sinkhorn_split


def _torch_split(mixes: torch.Tensor, p: HcParams, hc: int, iters: int, eps: float):
    s = p.scale
    pre = pointwise(torch.sigmoid, mixes[:, :hc] * s[0] + p.base[:hc]) + eps
    post = 2 * pointwise(torch.sigmoid, mixes[:, hc:2 * hc] * s[1] + p.base[hc:2 * hc])
    comb = torch.softmax((mixes[:, 2 * hc:] * s[2] + p.base[2 * hc:]).view(-1, hc, hc), dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


@pytest.mark.parametrize("rows", [1, 2, 7, 64, 129])
def test_split_bits_match_the_torch_loop(rows: int) -> None:
    hc, mix = 4, 24
    g = torch.Generator().manual_seed(rows)
    p = HcParams(torch.zeros(1), torch.randn(mix, generator=g), torch.rand(3, generator=g) + 0.5)
    mixes = torch.randn(rows, mix, generator=g) * 3
    with invariant.mode(True):
        got = sinkhorn_split(mixes, p, hc, 20, 1e-6)
        want = _torch_split(mixes, p, hc, 20, 1e-6)
    for name, a, b in zip(("pre", "post", "comb"), got, want):
        assert a.shape == b.shape and torch.equal(a, b), name
    # and the result is what it should be: the last pass normalised the columns
    assert torch.allclose(got[2].double().sum(-2), torch.ones(rows, hc, dtype=torch.float64), atol=1e-5)


def test_inference_mode_and_scale_row_cache() -> None:
    p = HcParams(torch.zeros(1), torch.zeros(24), torch.tensor([1.0, 2.0, 3.0]))
    assert p.scale_row(4).tolist() == [1.0] * 4 + [2.0] * 4 + [3.0] * 16
    with torch.inference_mode():
        pre, post, comb = sinkhorn_split(torch.zeros(1, 24), p, 4, 20, 1e-6)
    assert torch.allclose(comb, torch.full((1, 4, 4), 0.25), atol=1e-6)
