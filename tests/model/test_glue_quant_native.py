"""The model glue's FP8 simulation of the nope dims in one native call (csrc/glue_quant.cpp) gives the very bits
of the formats.fp8_fake_quant steps, on seeded random inputs of both activation dtypes, any leading shape,
partial last blocks, all-zero and wide-range blocks; bad arguments are refused with the argument named."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dsv4rt.formats import fp8_fake_quant
from dsv4rt.model import functional

_C = pytest.importorskip("dsv4rt._C", reason="the native extension dsv4rt._C is not built: csrc/glue_quant.cpp untested")
if not hasattr(_C, "fp8_sim_prefix"):
    pytest.skip("dsv4rt._C predates csrc/glue_quant.cpp (rebuild it): the native FP8 simulation is untested",
                allow_module_level=True)


def _steps(x: torch.Tensor, rope_dim: int) -> torch.Tensor:
    nope = x.shape[-1] - rope_dim
    return torch.cat([fp8_fake_quant(x[..., :nope].contiguous(), 64), x[..., nope:]], dim=-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,rope_dim", [((1, 576), 64), ((7, 160), 32), ((2, 3, 96), 0), ((5, 72), 72),
                                            ((33, 200), 8)])
def test_bits_match_the_formats_steps(dtype: torch.dtype, shape: tuple, rope_dim: int) -> None:
    g = torch.Generator().manual_seed(sum(shape) * 13 + rope_dim)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[:-1] + (1,), generator=g) * 6)
    x.view(-1, shape[-1])[0, :64] = 0                           # an all-zero block
    x = x.to(dtype)
    got = functional.fp8_sim_nope(x, rope_dim)
    want = _steps(x, rope_dim)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, want)


def test_non_contiguous_input() -> None:
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)[::2, :192]
    assert torch.equal(functional.fp8_sim_nope(x, 64), _steps(x, 64))


def test_bad_arguments_name_the_argument() -> None:
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match=r"fp8_sim_prefix.*k"):
        _C.fp8_sim_prefix(x, np.zeros((2, 8), np.float32), 9, 64)
    with pytest.raises(ValueError, match=r"fp8_sim_prefix.*out"):
        _C.fp8_sim_prefix(x, np.zeros((2, 7), np.float32), 4, 64)
    with pytest.raises(TypeError, match=r"fp8_sim_prefix.*out"):
        _C.fp8_sim_prefix(x, np.zeros((2, 8), np.int16), 4, 64)
    with pytest.raises(ValueError, match=r"fp8_sim_prefix.*block"):
        _C.fp8_sim_prefix(x, np.zeros((2, 8), np.float32), 4, 0)
