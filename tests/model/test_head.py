"""The output head keeps the checkpoint's bf16 weight on the CPU and gives float32 logits equal to the
float32 head's up to the summation order, row by row the same whatever the batch."""
from __future__ import annotations

import pytest
import torch

from dsv4rt import invariant
from dsv4rt.model.head import OutputHead
from dsv4rt.model.weights import Loader


class _Source:
    def __init__(self, w: torch.Tensor) -> None:
        self.w = w

    def get(self, name: str) -> torch.Tensor:
        assert name == "head.weight"
        return self.w


def _head(vocab: int, dim: int, seed: int) -> OutputHead:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(vocab, dim, generator=g) * 0.05).bfloat16()
    return OutputHead(Loader(_Source(w), torch.device("cpu"), torch.bfloat16), "head.weight")


@pytest.mark.parametrize("inv", [True, False])
@pytest.mark.parametrize("rows,vocab,dim", [(1, 259, 256), (5, 1000, 512), (3, 77, 96)])
def test_logits_match_float64(inv: bool, rows: int, vocab: int, dim: int) -> None:
    head = _head(vocab, dim, seed=rows * 7 + vocab)
    g = torch.Generator().manual_seed(rows)
    y = torch.randn(rows, dim, generator=g).bfloat16()
    with invariant.mode(inv):
        got = head(y)
    assert got.dtype == torch.float32 and got.shape == (rows, vocab)
    ref = y.double() @ head.weight.double().T
    # float32 products of exact bf16 values, float32 sums over dim terms: a few ulps of the magnitude summed
    bound = 4 * dim * torch.finfo(torch.float32).eps * (y.double().abs() @ head.weight.double().abs().T)
    assert bool(((got.double() - ref).abs() <= bound + 1e-30).all())


def test_bf16_weight_and_row_invariance() -> None:
    pytest.importorskip("dsv4rt._C", reason="the native extension is not built: the head widens to float32")
    head = _head(515, 256, seed=3)
    w = (torch.randn(515, 256, generator=torch.Generator().manual_seed(3)) * 0.05).bfloat16()
    assert head.weight.dtype == torch.bfloat16 and torch.equal(head.weight, w)   # the packed layout unpacks exactly
    assert head.nbytes == 520 * 256 * 2   # 8-row groups: 515 rows padded to 520
    y = torch.randn(9, 256, generator=torch.Generator().manual_seed(5))
    with invariant.mode(True):
        batch = head(y)
        alone = torch.cat([head(y[i:i + 1]) for i in range(9)])
    assert torch.equal(batch, alone)   # one summation order per output whatever the number of rows
    assert head(y.view(3, 3, 256)).shape == (3, 3, 515)


def test_wrong_width_is_refused() -> None:
    head = _head(64, 128, seed=1)
    with pytest.raises(ValueError, match="output head"):
        head(torch.randn(2, 96))


@pytest.mark.parametrize("rows,n,k", [(1, 8, 16), (1, 129, 100), (3, 37, 4100), (6, 1000, 512), (4, 5, 7)])
def test_packed_head_gives_dense_gemm_bits(rows: int, n: int, k: int) -> None:
    """dense_gemm_packed on dense_pack(w) equals dense_gemm on w bit for bit (odd N and K tails, any rows), and
    every row equals that row alone; the output is poisoned before the call."""
    C = pytest.importorskip("dsv4rt._C", reason="the native extension is not built")
    g = torch.Generator().manual_seed(n * 31 + k)
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    x = torch.randn(rows, k, generator=g) * torch.logspace(-3, 3, k)[torch.randperm(k, generator=g)]
    wb = w.view(torch.int16).numpy()
    ref = torch.full((rows, n), float("nan"))
    C.dense_gemm(x.numpy(), wb, ref.numpy())
    packed = C.dense_pack(wb)
    assert packed.shape == (-(-n // 8), -(-k // 16), 8, 16)
    got = torch.full((rows, n), float("nan"))
    C.dense_gemm_packed(x.numpy(), packed, n, got.numpy())
    assert torch.equal(got, ref)
    for r in range(rows):
        one = torch.full((1, n), float("nan"))
        C.dense_gemm_packed(x[r:r + 1].contiguous().numpy(), packed, n, one.numpy())
        assert torch.equal(one[0], ref[r])
    exact = x.double() @ w.double().T
    assert bool(((got.double() - exact).abs() <= 4 * k * 2 ** -24 * (x.double().abs() @ w.double().abs().T)).all())


def test_packed_head_refuses_a_wrong_layout() -> None:
    C = pytest.importorskip("dsv4rt._C", reason="the native extension is not built")
    w = torch.randn(20, 48).bfloat16().view(torch.int16).numpy()
    packed = C.dense_pack(w)
    out = torch.empty(1, 20).numpy()
    with pytest.raises(ValueError, match="w_packed"):
        C.dense_gemm_packed(torch.randn(1, 32).numpy(), packed, 20, out)   # K 32 is not the packed 48
    with pytest.raises(ValueError, match="w_packed"):
        C.dense_gemm_packed(torch.randn(1, 48).numpy(), packed, 40, torch.empty(1, 40).numpy())
