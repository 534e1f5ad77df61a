"""wo_a kept in its released FP8 form on the CPU (runtime/model/grouped.py): a bf16 model holds no bf16 copy,
and its logits are bit for bit those of the dequantised bf16 weight in the batch-invariant mode (the numerics
it gives in both modes), V4 and V4.1 (whose tiny preset stores wo_a bf16: it keeps that). Where the kernel
does not run, or the dtype is float32, wo_a is the dequantised tensor as before.
"""
from __future__ import annotations

import pytest
import torch

import dsv4rt.model.grouped as grouped
from dsv4rt import invariant
from dsv4rt.model.transformer import Transformer

pytestmark = pytest.mark.skipif(grouped._fp8_kernels() is None,
                                reason="SKIPPED: the FP8 wo_a kernel needs dsv4rt._C and a CPU with AVX512-BF16 and "
                                       "AVX512-VBMI")


def _logits(ck, monkeypatch, fp8: bool, inv: bool) -> torch.Tensor:
    if not fp8:
        monkeypatch.setattr(grouped, "_fp8_kernels", lambda: None)
    try:
        with invariant.mode(inv):
            model = Transformer(ck.cfg, ck)
            wo_a = model.layers[0].attn.wo_a
            assert (wo_a.fp8 is not None) == fp8 and (wo_a.weight is None) == fp8
            toks = torch.randint(3, 259, (2, 21), generator=torch.Generator().manual_seed(0))
            cache = model.new_cache(2, 64)
            out = [model.forward(toks[:, :16], cache)] + [model.forward(toks[:, i:i + 1], cache) for i in range(16, 21)]
            return torch.cat([o.float().flatten() for o in out])
    finally:
        monkeypatch.undo()


def test_fp8_wo_a_gives_the_bf16_weights_bits(tiny_ckpt, monkeypatch):
    assert torch.equal(_logits(tiny_ckpt, monkeypatch, True, True), _logits(tiny_ckpt, monkeypatch, False, True))


def test_float32_models_keep_the_dequantised_weight(tiny_ckpt):
    model = Transformer(tiny_ckpt.cfg, tiny_ckpt, dtype=torch.float32)
    wo_a = model.layers[0].attn.wo_a
    assert wo_a.fp8 is None and wo_a.weight.dtype == torch.float32


def test_v41_fp8_wo_a_block_32_gives_the_bf16_weights_bits(tmp_path_factory, monkeypatch):
    from dsv4rt.formats import quant_fp8_block
    from dsv4rt.model.checkpoint import Checkpoint, write_checkpoint
    from dsv4rt.model.synthetic import tiny_checkpoint

    ck = Checkpoint(tiny_checkpoint(root=str(tmp_path_factory.mktemp("v41")), name="tiny-v41"))
    tensors = []
    for name in ck.schema:
        t = ck.get(name)
        if name.endswith("attn.wo_a.weight"):          # as the release may store it: FP8 with 32 x 32 scales
            w8, s = quant_fp8_block(t.float(), 32)
            tensors += [(name, w8), (name[:-len("weight")] + "scale", s.view(torch.float8_e8m0fnu))]
        else:
            tensors.append((name, t))
    ck8 = Checkpoint(write_checkpoint(str(tmp_path_factory.mktemp("v41fp8") / "ck"), ck.cfg, tensors))
    assert torch.equal(_logits(ck8, monkeypatch, True, True), _logits(ck8, monkeypatch, False, True))


def test_bf16_wo_a_built_in_the_mode_keeps_only_its_packed_form(tmp_path_factory, monkeypatch):
    """tiny-v41 stores wo_a bf16: built in the batch-invariant mode on the CPU only the packed layout is kept;
    logits equal those of the plain tensor in that mode, and the mode switched off unpacks it (einsum's bits)."""
    from dsv4rt.model.checkpoint import Checkpoint
    from dsv4rt.model.synthetic import tiny_checkpoint

    ck = Checkpoint(tiny_checkpoint(root=str(tmp_path_factory.mktemp("v41bf16")), name="tiny-v41"))
    toks = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(1))

    def run(model, inv):
        with invariant.mode(inv):
            cache = model.new_cache(2, 64)
            return torch.cat([model.forward(toks[:, :9], cache).float().flatten()] +
                             [model.forward(toks[:, i:i + 1], cache).float().flatten() for i in range(9, 12)])

    with invariant.mode(True):
        packed = Transformer(ck.cfg, ck)
    wo_a = packed.layers[0].attn.wo_a
    assert wo_a.fp8 is None and wo_a._packed and wo_a._weight is None
    monkeypatch.setattr(grouped, "pack_grouped", lambda w: ())
    with invariant.mode(True):
        plain = Transformer(ck.cfg, ck)
    assert plain.layers[0].attn.wo_a._weight is not None
    assert torch.equal(run(packed, True), run(plain, True))
    assert torch.equal(run(packed, False), run(plain, False))
    assert torch.equal(wo_a.weight, plain.layers[0].attn.wo_a.weight)
