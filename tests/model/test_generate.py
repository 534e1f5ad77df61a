"""Generation (greedy, seeded sampling, EOS, ragged prompts), tokenizers, MTP and the torch glue."""
from __future__ import annotations

import math

import pytest
import torch

import dsv4rt
from dsv4rt.errors import CheckpointError
from dsv4rt.model.attention import window_indices
from dsv4rt.model.generate import generate, sample
from dsv4rt.model.mhc import HcParams, sinkhorn_split
from dsv4rt.model.rope import RopeTable, apply_rope
from dsv4rt.model.tokenizer import ByteTokenizer, load_tokenizer
from dsv4rt.model.functional import hadamard


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    from dsv4rt.model.transformer import Transformer

    return Transformer(tiny_ckpt.cfg, tiny_ckpt, dtype=torch.float32, quant=False, mtp=True)


def test_greedy_is_deterministic_and_matches_forward(model):
    prompt = ByteTokenizer().encode("hello")
    with dsv4rt.use_backend("cpu"):
        a = generate(model, [prompt], 6)
        b = generate(model, [prompt], 6)
        cache = model.new_cache()
        first = int(model.forward(torch.tensor([prompt]), cache).argmax())
    assert a.tokens == b.tokens and len(a.tokens[0]) == 6 and a.tokens[0][0] == first
    assert a.decode_steps == 5 and a.prompt_tokens == len(prompt)


def test_sampling_with_a_seed(model):
    prompt = ByteTokenizer().encode("abc")
    with dsv4rt.use_backend("cpu"):
        s1 = generate(model, [prompt], 8, temperature=1.0, seed=1).tokens
        s2 = generate(model, [prompt], 8, temperature=1.0, seed=1).tokens
        s3 = generate(model, [prompt], 8, temperature=1.0, seed=2).tokens
    assert s1 == s2 and s1 != s3


def test_gumbel_max_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    frac = sample(logits, 1.0, g).float().mean().item()
    assert abs(frac - 0.75) < 0.03
    assert sample(logits[:1], 0.0, None).item() == 1


def test_stops_at_eos(model):
    prompt = ByteTokenizer().encode("xyz")
    with dsv4rt.use_backend("cpu"):
        free = generate(model, [prompt], 5).tokens[0]
        stopped = generate(model, [prompt], 5, eos_id=free[2]).tokens[0]
    assert stopped == free[:free.index(free[2]) + 1]


def test_ragged_prompts_match_single_runs(model):
    tok = ByteTokenizer()
    prompts = [tok.encode("a short one"), tok.encode("a much longer prompt here")]
    with dsv4rt.use_backend("cpu"):
        both = generate(model, prompts, 4).tokens
        alone = [generate(model, [p], 4).tokens[0] for p in prompts]
    assert both == alone


def test_chunked_prefill_generation(model):
    prompt = ByteTokenizer().encode("chunked prefill of a prompt")
    with dsv4rt.use_backend("cpu"):
        assert generate(model, [prompt], 4, prefill_chunk=5).tokens == generate(model, [prompt], 4).tokens


def test_mtp_block(model):
    with dsv4rt.use_backend("cpu"):
        cache = model.new_cache()
        toks = torch.tensor([[0, 40, 50, 60, 70]])
        _, hidden = model.forward(toks[:, :4], cache, return_hidden=True)
        logits = model.forward_mtp(hidden, toks[:, 1:], cache, 0, all_logits=True)
    assert logits.shape == (1, 4, 259) and torch.isfinite(logits).all()


def test_byte_tokenizer_and_missing_tokenizers_package(tmp_path, tiny_ckpt):
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids[0] == 0 and tok.decode(ids) == "héllo" and max(ids) < 259
    assert isinstance(load_tokenizer(tiny_ckpt.cfg, None), ByteTokenizer)
    (tmp_path / "tokenizer.json").write_text("{}")
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        with pytest.raises(CheckpointError, match="needs the 'tokenizers' package"):
            load_tokenizer(tiny_ckpt.cfg, str(tmp_path))
    else:
        with pytest.raises(CheckpointError, match="tokenizer.json"):
            load_tokenizer(tiny_ckpt.cfg, str(tmp_path))


# ---- glue ------------------------------------------------------------------------------------------

def test_rope_inverse_and_reference_tables():
    table = RopeTable(64, 256, 160000.0, 65536, 16.0, 32, 1)
    x = torch.randn(3, 5, 128)
    pos = torch.tensor([0, 7, 200])
    cos, sin = table.at(pos)
    y = apply_rope(x, cos[:, None], sin[:, None])
    assert torch.equal(y[..., :64], x[..., :64]) and not torch.allclose(y, x)
    back = apply_rope(y, cos[:, None], sin[:, None], inverse=True)
    assert torch.allclose(back, x, atol=1e-5)
    plain = RopeTable(64, 8, 10000.0)
    assert torch.allclose(plain.cos[1, 0], torch.tensor(math.cos(1.0)))        # freq 0 = 1 rad / token
    # YaRN: the highest frequency is kept, the lowest divided by the factor (16)
    assert abs(table.cos[200, 0].item() - math.cos(200.0)) < 1e-4
    low = 160000.0 ** (-62 / 64) / 16
    assert abs(table.sin[200, 31].item() - math.sin(200 * low)) < 1e-6


def test_sinkhorn_is_doubly_stochastic():
    hc = 4
    p = HcParams(torch.zeros(24, 8), torch.randn(24), torch.tensor([1.0, 1.0, 1.0]))
    pre, post, comb = sinkhorn_split(torch.randn(10, 24) * 3, p, hc, 20, 1e-6)
    assert torch.allclose(comb.sum(-2), torch.ones(10, hc), atol=1e-4)      # the last pass normalises columns
    assert torch.allclose(comb.sum(-1), torch.ones(10, hc), atol=0.1)       # rows: 20 iterations, not exact
    assert (pre > 0).all() and (post > 0).all() and (post < 2).all()


def test_hadamard_is_orthonormal():
    x = torch.randn(4, 128)
    assert torch.allclose(hadamard(hadamard(x)), x, atol=1e-5)
    assert torch.allclose(hadamard(x).norm(dim=-1), x.norm(dim=-1), atol=1e-4)


def test_window_indices():
    w = 4
    chunk = window_indices(torch.arange(5, 8), 5, w, decode=False)
    # positions 2..5 for query 5: 2,3,4 from the ring (slots 2,3,0), 5 from the chunk (row 4 + 0)
    assert chunk[0].tolist() == [2, 3, 0, 4]
    assert window_indices(torch.tensor([1]), 1, w, decode=True)[0].tolist() == [-1, -1, 0, 1]
    assert window_indices(torch.tensor([9]), 9, w, decode=True)[0].tolist() == [2, 3, 0, 1]


def test_fast_synthetic_weights_run(tiny_ckpt):
    """The in-memory generator of the flash-slice preset (FP4 codes / FP8 values drawn directly)."""
    from dsv4rt.model.config import preset
    from dsv4rt.model.synthetic import SyntheticSource
    from dsv4rt.model.transformer import Transformer

    cfg = preset("tiny")
    src = SyntheticSource(cfg, seed=3, fast=True, mtp=False)
    w = src.get("layers.0.ffn.experts.0.w1.weight")
    assert w.dtype == torch.int8 and w.shape == (128, 128)
    assert src.get("layers.0.ffn.experts.0.w1.scale").dtype == torch.float8_e8m0fnu
    model = Transformer(cfg, src)
    with dsv4rt.use_backend("cpu"):
        logits = model.forward(torch.tensor([[0, 10, 20, 30, 40]]), model.new_cache())
    assert torch.isfinite(logits).all() and 0.2 < logits.std().item() < 5
    assert preset("flash-slice").dim == 4096 and preset("flash-slice").n_routed_experts == 256
