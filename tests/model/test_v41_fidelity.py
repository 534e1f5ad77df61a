"""V4.1 fidelity: the model, per position, against a forward pass built only from the float64 reference ops
(fp32, quantisation off: within 1e-5 relative), plus decode == prefill and the release-precision run.

The reference forward is the same glue with every registry op on ``dsv4rt.reference`` (ReferenceCaller), so a
wrong kernel, a wrong op mode or a wrong selection of one shows up as a per-position logit difference."""
from __future__ import annotations

import pytest
import torch

from dsv4rt.model import Checkpoint, Transformer, tiny_checkpoint
from dsv4rt.model.opcheck import ReferenceCaller


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Checkpoint:
    return Checkpoint(tiny_checkpoint(name="tiny-v41", root=str(tmp_path_factory.mktemp("v41"))))


def _tokens(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (1, n), generator=g)


def _logits(model, toks: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    cache = model.new_cache(1, 512)
    if chunk is None:
        return model.forward(toks, cache, all_logits=True)[0]
    out = [model.forward(toks[:, i:i + chunk], cache, all_logits=True)[0] for i in range(0, toks.shape[1], chunk)]
    return torch.cat(out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().amax(-1) / b.abs().amax(-1)


def test_fp32_model_matches_reference_ops_per_position(ck):
    # 300 tokens: the 128-token window wraps, ratio-2 and ratio-1 caches fill, the candidate blocks (4 of 8
    # positions) cut the level-2 indexer's choice, both Engram layers hash 2/3/4-grams
    toks = _tokens(300, 1)
    model = Transformer(ck.cfg, ck, dtype=torch.float32, quant=False, precision="fp32")
    got = _logits(model, toks)
    model.ops = ReferenceCaller(quant=False, precision="fp32")
    want = _logits(model, toks)
    rel = _rel(got, want)
    assert torch.isfinite(got).all()
    assert float(rel.max()) < 1e-5, f"worst position {int(rel.argmax())}: {float(rel.max()):.3g}"


def test_decode_and_chunks_match_prefill(ck):
    toks = _tokens(260, 2)
    model = Transformer(ck.cfg, ck, dtype=torch.float32, quant=False, precision="fp32")
    full = _logits(model, toks)
    for chunk in (1, 37):
        rel = _rel(_logits(model, toks, chunk), full)
        assert float(rel.max()) < 1e-5, f"chunk {chunk}: position {int(rel.argmax())}: {float(rel.max()):.3g}"


def test_release_precision_runs_on_the_packed_cache(ck):
    toks = _tokens(200, 3)
    model = Transformer(ck.cfg, ck)                        # bf16, FP8/FP4 quantisation on
    cache = model.new_cache(1, 512)
    logits = model.forward(toks, cache, all_logits=True)[0]
    assert torch.isfinite(logits).all()
    assert cache.layers[0].win.dtype == torch.uint8 and cache.layers[0].win.shape[-1] == 128 + 4
    assert cache.layers[1].glob.shape[-1] == 64 + 8 and cache.layers[1].ikeys.shape[-1] == 64
    assert cache.layers[2].glob.data_ptr() == cache.layers[1].glob.data_ptr()   # a reader shares its source's
    # the fp32 quantised model stays close to the smooth one (a sanity bound, not a verdict)
    f32q = _logits(Transformer(ck.cfg, ck, dtype=torch.float32, precision="fp32"), toks)
    f32 = _logits(Transformer(ck.cfg, ck, dtype=torch.float32, quant=False, precision="fp32"), toks)
    assert float(_rel(f32q, f32).median()) < 0.2
