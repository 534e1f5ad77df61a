"""The model's precision modes (release / fp32) and its independence from torch's default dtype."""
from __future__ import annotations

import pytest
import torch


def _run(model, steps: int = 3) -> torch.Tensor:
    cache = model.new_cache(1, 64)
    tokens = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11, 64, 128]])
    out = [model.forward(tokens, cache)[:, -1]]
    for _ in range(steps):
        nxt = out[-1].argmax(-1).view(1, 1)
        out.append(model.forward(nxt, cache)[:, -1])
    return torch.stack(out)


def test_model_runs_the_same_under_a_bf16_default_dtype(tiny_ckpt, build):
    """The released generate.py sets torch.set_default_dtype(torch.bfloat16): nothing may depend on it."""
    want = _run(build(tiny_ckpt))
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        got = _run(build(tiny_ckpt))
    finally:
        torch.set_default_dtype(saved)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


def test_release_precision_is_the_default_and_fp32_mode_keeps_fp32(tiny_ckpt, build):
    release = build(tiny_ckpt)
    assert release.ops.precision == "release"
    fp32 = build(tiny_ckpt, precision="fp32")
    a, b = _run(release), _run(fp32)
    assert not torch.equal(a, b)                                  # the precision points are in use
    assert float((a - b).abs().max()) < 0.5 * float(a.abs().max())  # and they are rounding-size changes
    with pytest.raises(ValueError, match="precision"):
        build(tiny_ckpt, precision="bf16")
