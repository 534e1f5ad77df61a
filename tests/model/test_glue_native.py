"""The model glue's RoPE (csrc/glue_rope.cpp) and MXFP4 simulation (csrc/glue_mxsim.cpp) in one native call
each give the very bits of their torch / formats steps, and ``invariant.grouped_linear`` those of one
``invariant.linear`` per group: seeded random inputs, both activation dtypes, every broadcast of the RoPE
tables the model uses, forward and inverse, NaN / inf / zero / wide-range MXFP4 blocks; bad arguments are
refused with the argument named."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dsv4rt import invariant
from dsv4rt.formats import fp4_fake_quant
from dsv4rt.model import functional, rope

_C = pytest.importorskip("dsv4rt._C", reason="the native extension dsv4rt._C is not built: csrc/glue_*.cpp untested")
if not (hasattr(_C, "rope_rows") and hasattr(_C, "mx_sim")):
    pytest.skip("dsv4rt._C predates csrc/glue_rope.cpp / glue_mxsim.cpp (rebuild it): the native glue is untested",
                allow_module_level=True)


def _rope_steps(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    rd = 2 * cos.shape[-1]
    xr = x[..., -rd:].float().unflatten(-1, (-1, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    if inverse:
        sin = -sin
    y = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([x[..., :-rd], y], dim=-1)


# (x shape, cos shape): q [T, H, D] with [T, 1, h], kv [T, D] with [T, h], entries [1, n, D] with [n, h],
# a lockstep q [B, S, H, D] with [S, 1, h] (B = 1 native, B = 2 the torch path), whole-row rotation
_SHAPES = [((5, 8, 192), (5, 1, 32)), ((7, 96), (7, 16)), ((1, 3, 128), (3, 32)), ((1, 4, 2, 64), (4, 1, 16)),
           ((2, 4, 2, 64), (4, 1, 16)), ((6, 64), (6, 32)), ((3, 5, 40), (3, 5, 4))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("xs,cs", _SHAPES)
def test_rope_bits_match_the_torch_steps(dtype: torch.dtype, inverse: bool, xs: tuple, cs: tuple) -> None:
    g = torch.Generator().manual_seed(sum(xs) * 7 + sum(cs))
    x = (torch.randn(xs, generator=g) * torch.exp(torch.randn(xs[:-1] + (1,), generator=g) * 4)).to(dtype)
    ang = torch.randn(cs, generator=g) * 50
    cos, sin = torch.cos(ang), torch.sin(ang)
    got = rope.apply_rope(x, cos, sin, inverse=inverse)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, _rope_steps(x, cos, sin, inverse))


def test_rope_non_contiguous_input_and_the_native_call_is_taken() -> None:
    x = torch.randn(6, 4, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)[::2, :, :128]
    cos, sin = torch.rand(3, 1, 32), torch.rand(3, 1, 32)
    assert rope._native_rep(x, cos, sin) == 4
    assert torch.equal(rope.apply_rope(x, cos, sin), _rope_steps(x, cos, sin, False))
    assert rope._native_rep(torch.zeros(2, 3, 64), torch.zeros(3, 32), torch.zeros(3, 32)) == 0   # torch path


def test_rope_span_is_the_gathered_rows() -> None:
    t = rope.RopeTable(16, 40, 10000.0)
    for p0, s, b in [(0, 1, 1), (7, 3, 1), (9, 2, 3), (39, 1, 2)]:
        pos = torch.arange(p0, p0 + s).repeat(b)
        cos, sin = t.span(p0, s, b)
        assert torch.equal(cos, t.cos[pos]) and torch.equal(sin, t.sin[pos])
    with pytest.raises(IndexError, match="RoPE table"):
        t.span(39, 2, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 128), (3, 16, 128), (2, 1, 64), (9, 32)])
def test_mx_sim_bits_match_the_formats_steps(dtype: torch.dtype, shape: tuple) -> None:
    g = torch.Generator().manual_seed(sum(shape) * 3)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[:-1] + (1,), generator=g) * 8)
    flat = x.view(-1, shape[-1])
    flat[0, :32] = 0                                   # an all-zero block
    if flat.shape[0] > 1:
        flat[1, :32] *= 1e-37                          # a block at the scale's floor
        flat[-1, -32:] = torch.tensor([6.0, -3.0, 0.25, 1e30] * 8)    # saturation, exact grid points, huge
    x = x.to(dtype)
    got = functional.fp4_sim(x)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, fp4_fake_quant(x.contiguous(), 32))


def test_mx_sim_nan_and_inf_blocks_as_the_formats_steps() -> None:
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    x[0, 3] = float("nan")
    x[1, 40] = float("inf")
    got, want = functional.fp4_sim(x), fp4_fake_quant(x, 32)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    keep = ~torch.isnan(want)
    assert torch.equal(got[keep], want[keep])


def test_bad_arguments_name_the_argument() -> None:
    x = np.zeros((4, 64), np.float32)
    c = np.zeros((2, 16), np.float32)
    with pytest.raises(ValueError, match=r"rope_rows.*rep"):
        _C.rope_rows(x, c, c, np.zeros((4, 64), np.float32), 3, False)
    with pytest.raises(ValueError, match=r"rope_rows.*sin"):
        _C.rope_rows(x, c, np.zeros((2, 8), np.float32), np.zeros((4, 64), np.float32), 2, False)
    with pytest.raises(ValueError, match=r"rope_rows.*cos"):
        _C.rope_rows(x, np.zeros((2, 40), np.float32), np.zeros((2, 40), np.float32), x.copy(), 2, False)
    with pytest.raises(TypeError, match=r"rope_rows.*out"):
        _C.rope_rows(x, c, c, np.zeros((4, 64), np.int16), 2, False)
    with pytest.raises(ValueError, match=r"mx_sim.*block"):
        _C.mx_sim(x, np.zeros((4, 64), np.float32), 48, 1 / 6)
    with pytest.raises(ValueError, match=r"mx_sim.*out"):
        _C.mx_sim(x, np.zeros((4, 32), np.float32), 32, 1 / 6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("on", [True, False])
def test_grouped_linear_is_linear_per_group(dtype: torch.dtype, t: int, on: bool) -> None:
    g = torch.Generator().manual_seed(11 + t)
    x = torch.randn(t, 4, 96, generator=g).to(dtype)
    w = torch.randn(4, 40, 96, generator=g).to(dtype)
    with invariant.mode(on):
        got = invariant.grouped_linear(x, w)
        want = torch.stack([invariant.linear(x[:, i], w[i]) for i in range(4)], dim=1).reshape(t, -1)
    assert got.shape == (t, 160) and torch.equal(got, want)
    with pytest.raises(ValueError, match="grouped_linear"):
        invariant.grouped_linear(x, w[:3])


@pytest.mark.parametrize("window", [1, 4, 7])
def test_decode_window_is_window_indices(window: int) -> None:
    from dsv4rt.model.attention import decode_window, window_indices

    for p0 in range(3 * window + 2):
        want = window_indices(torch.tensor([p0]), p0, window, decode=True)
        got = decode_window(p0, window, torch.device("cpu"))
        assert got.dtype == torch.int32 and torch.equal(got, want), p0


@pytest.mark.parametrize("t", [1, 2, 5])
@pytest.mark.parametrize("k,r", [(96, 40), (256, 64), (77, 13)])
def test_grouped_linear_on_packed_weights_has_dense_gemms_bits(t: int, k: int, r: int) -> None:
    g = torch.Generator().manual_seed(k + r + t)
    x = (torch.randn(t, 3, k, generator=g) * torch.exp(torch.randn(t, 3, 1, generator=g) * 3)).to(torch.bfloat16)
    w = torch.randn(3, r, k, generator=g).to(torch.bfloat16)
    packed = invariant.pack_grouped(w)
    assert len(packed) == 3
    with invariant.mode(True):
        got = invariant.grouped_linear(x, w, packed)
        want = torch.stack([invariant.linear(x[:, i], w[i]) for i in range(3)], dim=1).reshape(t, -1)
    assert torch.equal(got, want)
    assert invariant.pack_grouped(w.float()) == ()


def test_dense_bf16_packed_checks_its_arguments() -> None:
    w = np.zeros((10, 40), np.int16)
    p = _C.dense_bf16_pack(w)
    assert p.shape == (2, 2, 8, 32)
    with pytest.raises(ValueError, match=r"dense_bf16_packed.*w_packed"):
        _C.dense_bf16_packed(np.zeros((1, 70), np.int16), p, 10, np.zeros((1, 10), np.int16))
    with pytest.raises(ValueError, match=r"dense_bf16_packed.*out"):
        _C.dense_bf16_packed(np.zeros((1, 40), np.int16), p, 10, np.zeros((1, 9), np.int16))


@pytest.mark.parametrize("t", [1, 3])
def test_linear_on_a_packed_bf16_valued_weight_has_dense_gemms_bits(t: int) -> None:
    g = torch.Generator().manual_seed(40 + t)
    x = torch.randn(t, 200, generator=g) * 3
    w = torch.randn(70, 200, generator=g).to(torch.bfloat16).float()     # float32 holding bf16 values
    packed = invariant.pack_dense(w)
    assert packed is not None
    with invariant.mode(True):
        assert torch.equal(invariant.linear(x, w, packed), invariant.linear(x, w))
    w[3, 5] += 1e-3                                                      # no longer bf16 values: not packed
    assert invariant.pack_dense(w) is None
