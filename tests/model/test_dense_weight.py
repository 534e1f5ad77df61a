"""``invariant.DenseWeight`` keeps one form of a bf16-valued float32 weight: packed when built in the
batch-invariant mode on the CPU (packed at build, no float32 copy, nothing added by a call in the mode),
else float32; either way each mode gets its own bits (``dense_gemm``'s in the mode, torch's matmul out of
it), whichever mode the weight (or the model) was built in. Seeded random weights and inputs; the tiny V4
and V4.1 models' compressors built in one mode and called in both."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dsv4rt import invariant
from dsv4rt.model.checkpoint import Checkpoint
from dsv4rt.model.synthetic import tiny_checkpoint
from dsv4rt.model.transformer import Transformer

_C = pytest.importorskip("dsv4rt._C", reason="the native extension dsv4rt._C is not built: DenseWeight's packed "
                                             "form is untested")
if not (hasattr(_C, "dense_pack") and hasattr(_C, "dense_gemm_packed")):
    pytest.skip("dsv4rt._C predates dense_pack / dense_gemm_packed (rebuild it): DenseWeight's packed form is "
                "untested", allow_module_level=True)


def _weight(seed: int, n: int = 70, k: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g).to(torch.bfloat16).float()     # float32 holding bf16 values


def _x(seed: int, t: int, k: int = 200) -> torch.Tensor:
    return torch.randn(t, k, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("n,k", [(70, 200), (64, 256), (9, 17)])
def test_unpack_dense_gives_back_the_weight(n: int, k: int) -> None:
    w = _weight(n + k, n, k)
    got = invariant.unpack_dense(invariant.pack_dense(w), n, k)
    assert got.dtype == torch.bfloat16 and got.shape == (n, k)
    assert torch.equal(got.float(), w)


@pytest.mark.parametrize("t", [1, 5])
def test_built_in_the_mode_keeps_only_the_packed_form_and_gives_each_modes_bits(t: int) -> None:
    w = _weight(3)
    x = _x(4 + t, t)
    with invariant.mode(True):
        dw = invariant.DenseWeight(w.clone())
        assert dw.packed is not None and dw._plain is None
        assert dw.nbytes == dw.packed.nbytes < w.numel() * 4
        got = dw(x)
        assert dw._plain is None                      # a call in the mode adds nothing
        assert torch.equal(got, invariant.linear(x, w))
    with invariant.mode(False):
        got_off = dw(x)
        assert torch.equal(got_off, x @ w.T)          # torch's matmul bits on the unpacked float32 values
        assert dw._plain is not None                  # kept from the first call out of the mode on
        assert torch.equal(dw(x), got_off)
    with invariant.mode(True):
        assert torch.equal(dw(x), invariant.linear(x, w))


@pytest.mark.parametrize("on", [True, False])
def test_a_bf16_weight_is_packed_or_widened_as_its_float32_values_are(on: bool) -> None:
    w = _weight(12)
    x = _x(13, 4)
    with invariant.mode(on):
        from_bf16, from_f32 = invariant.DenseWeight(w.to(torch.bfloat16)), invariant.DenseWeight(w)
        assert (from_bf16.packed is not None) == on and (from_bf16._plain is None) == on
        if on:
            assert np.array_equal(from_bf16.packed, from_f32.packed)
        else:
            assert from_bf16._plain.dtype == torch.float32 and torch.equal(from_bf16._plain, w)
    for mode in (True, False):
        with invariant.mode(mode):
            assert torch.equal(from_bf16(x), from_f32(x))


def test_built_out_of_the_mode_keeps_float32_and_gives_each_modes_bits() -> None:
    w = _weight(5)
    x = _x(6, 3)
    with invariant.mode(False):
        dw = invariant.DenseWeight(w)
        assert dw.packed is None and torch.equal(dw._plain, w)
        assert torch.equal(dw(x), x @ w.T)
    with invariant.mode(True):
        assert torch.equal(dw(x), invariant.linear(x, w))
        assert dw.packed is None                      # nothing packed lazily


def test_a_weight_without_bf16_values_stays_float32() -> None:
    w = _weight(7)
    w[3, 5] += 1e-3
    x = _x(8, 2)
    with invariant.mode(True):
        dw = invariant.DenseWeight(w)
        assert dw.packed is None
        assert torch.equal(dw(x), invariant.linear(x, w))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="DenseWeight.*float32 or bf16"):
        invariant.DenseWeight(torch.zeros(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="DenseWeight.*float32 or bf16"):
        invariant.DenseWeight(torch.zeros(2, 4, 8))
    with invariant.mode(True):
        dw = invariant.DenseWeight(_weight(9))
        with pytest.raises(ValueError, match=r"DenseWeight.*\[\.\.\., 200\]"):
            dw(torch.zeros(2, 100))


def _dense_weights(model: Transformer) -> list[invariant.DenseWeight]:
    found = []
    for blk in model.layers:
        attn = blk.attn
        for comp in (getattr(attn, "compressor", None), getattr(getattr(attn, "indexer", None), "compressor", None)):
            w = getattr(comp, "w_kvg", None)
            if isinstance(w, invariant.DenseWeight):
                found.append(w)
    return found


def _logits(model: Transformer, on: bool) -> list[torch.Tensor]:
    toks = torch.randint(3, 250, (2, 21), generator=torch.Generator().manual_seed(11))
    with invariant.mode(on):
        cache = model.new_cache(2, max_seq_len=32)
        outs = [model.forward(toks, cache)]
        for i in range(2):
            outs.append(model.forward(toks[:, i:i + 1], cache))
    return outs


@pytest.mark.parametrize("name", ["tiny", "tiny-v41"])
def test_a_model_built_in_either_mode_computes_both_modes_alike(name: str, tmp_path_factory) -> None:
    ck = Checkpoint(tiny_checkpoint(name=name, root=str(tmp_path_factory.mktemp(name))))
    with invariant.mode(True):
        packed = Transformer(ck.cfg, ck)
    with invariant.mode(False):
        plain = Transformer(ck.cfg, ck)
    weights = _dense_weights(packed)
    assert weights, f"{name}: no compressor projection found"
    assert all(w.packed is not None and w._plain is None for w in weights)
    assert all(w.packed is None for w in _dense_weights(plain))
    for a, b in zip(_logits(packed, True), _logits(plain, True)):
        assert torch.equal(a, b)
    assert all(w._plain is None for w in weights)     # the mode's calls add no float32 copy
    for a, b in zip(_logits(packed, False), _logits(plain, False)):
        assert torch.equal(a, b)
