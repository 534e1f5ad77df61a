"""The native mHC glue (csrc/mhc.cpp) gives the very bits of the Python path it replaces: the Sinkhorn
normalisation of the NumPy steps, ``hc_post`` of the batch-invariant torch loop, on seeded random inputs of
every supported dtype, for any number of rows; bad arguments are refused with the function and argument named."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dsv4rt import invariant
from dsv4rt.model import mhc

_C = pytest.importorskip("dsv4rt._C", reason="the native extension dsv4rt._C is not built: csrc/mhc.cpp untested")
if not hasattr(_C, "mhc_sinkhorn"):
    pytest.skip("dsv4rt._C predates csrc/mhc.cpp (rebuild it): the native mHC glue is untested",
                allow_module_level=True)


def _comb(rows: int, hc: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, hc, hc, generator=g) * 4
    return (torch.softmax(z, dim=-1) + 1e-6).numpy().copy()


@pytest.mark.parametrize("hc", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("rows,iters", [(1, 20), (3, 1), (64, 2), (257, 20)])
def test_sinkhorn_bits_match_numpy(hc: int, rows: int, iters: int) -> None:
    a = _comb(rows, hc, 100 * hc + rows)
    want = a.copy()
    mhc._normalise_numpy(want, iters, 1e-6)
    got = a.copy()
    _C.mhc_sinkhorn(got, iters, 1e-6)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    if iters > 1:   # and it normalises: the last pass made every column sum to ~1
        np.testing.assert_allclose(got.astype(np.float64).sum(-2), 1.0, atol=1e-4)


def test_normalise_takes_the_native_path_and_keeps_the_bits() -> None:
    a = _comb(33, 4, 7)
    want = a.copy()
    mhc._normalise_numpy(want, 20, 1e-6)
    got = mhc._normalise(torch.from_numpy(a.copy()), 20, 1e-6)
    assert torch.equal(got, torch.from_numpy(want))


def _post_inputs(rows: int, hc: int, dim: int, f_dtype: torch.dtype, r_dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    f = (torch.randn(rows, dim, generator=g) * 3).to(f_dtype)
    r = (torch.randn(rows, hc, dim, generator=g) * 5).to(r_dtype)
    post = 2 * torch.sigmoid(torch.randn(rows, hc, generator=g))
    comb = torch.from_numpy(_comb(rows, hc, seed + 1))
    mhc._normalise(comb, 20, 1e-6)
    return f, r, post, comb


@pytest.mark.parametrize("f_dtype,r_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("rows,hc,dim", [(1, 4, 256), (5, 4, 33), (33, 1, 7), (3, 7, 64)])
def test_post_bits_match_the_torch_loop(f_dtype, r_dtype, rows: int, hc: int, dim: int) -> None:
    f, r, post, comb = _post_inputs(rows, hc, dim, f_dtype, r_dtype, rows * 31 + hc * 7 + dim)
    with invariant.mode(True):
        want = mhc._post_torch(f, r, post, comb)
        got = mhc.hc_post(f, r, post, comb)
    assert got.dtype == f_dtype and got.shape == (rows, hc, dim)
    assert torch.equal(got, want)
    # the kernel writes every element (poisoned output buffer)
    out = torch.full((rows, hc, dim), float("nan"), dtype=f_dtype)
    _C.mhc_post(mhc._bits(f), mhc._bits(r), post.numpy(), comb.numpy(), mhc._bits(out))
    assert torch.equal(out, want)


def test_post_outside_the_mode_is_the_einsum_path() -> None:
    f, r, post, comb = _post_inputs(4, 4, 16, torch.float32, torch.float32, 3)
    with invariant.mode(False):
        got = mhc.hc_post(f, r, post, comb)
    torch.testing.assert_close(got, mhc._post_torch(f, r, post, comb), rtol=1e-6, atol=1e-6)


def test_bad_arguments_name_function_and_argument() -> None:
    with pytest.raises(ValueError, match=r"mhc_sinkhorn.*comb"):
        _C.mhc_sinkhorn(np.zeros((2, 3, 4), np.float32), 20, 1e-6)
    with pytest.raises(ValueError, match=r"mhc_sinkhorn.*iters"):
        _C.mhc_sinkhorn(np.zeros((2, 4, 4), np.float32), 0, 1e-6)
    with pytest.raises(TypeError, match=r"mhc_sinkhorn.*comb"):
        _C.mhc_sinkhorn(np.zeros((2, 4, 4), np.float64), 20, 1e-6)
    f, r, post, comb = _post_inputs(2, 4, 8, torch.float32, torch.float32, 5)
    out = np.zeros((2, 4, 8), np.float32)
    with pytest.raises(ValueError, match=r"mhc_post.*post"):
        _C.mhc_post(f.numpy(), r.numpy(), post[:1].numpy(), comb.numpy(), out)
    with pytest.raises(TypeError, match=r"mhc_post.*out"):
        _C.mhc_post(f.numpy(), r.numpy(), post.numpy(), comb.numpy(), np.zeros((2, 4, 8), np.int16))
