"""DeepSeek-V4.1 config, checkpoint schema, cache accounting, pool slots and the CLI, on tiny-v41."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dsv4rt.errors import CheckpointError
from dsv4rt.model import Checkpoint, Transformer, checkpoint_schema, preset, tiny_checkpoint
from dsv4rt.model.config import from_dict, load_config
from dsv4rt.model.kvpool import KVPool
from dsv4rt.model.kvsize_v41 import global_bytes_per_token

# the released top-level config.json of DeepSeek-V4.1-Flash (its text_config and quantization_config values)
RELEASED_TEXT = {
    "model_type": "deepseek_v41_text", "vocab_size": 129280, "hidden_size": 5120, "moe_intermediate_size": 2304,
    "num_hidden_layers": 40, "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512,
    "qk_rope_head_dim": 64, "q_lora_rank": 1280, "o_lora_rank": 1024, "o_groups": 8, "hidden_act": "silu",
    "swiglu_limit": 10.0, "rms_norm_eps": 1e-20, "max_position_embeddings": 1048576, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 16, "beta_fast": 32, "beta_slow": 1,
                     "original_max_position_embeddings": 65536},
    "n_routed_experts": 384, "n_shared_experts": 1, "num_experts_per_tok": 6, "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 1.5, "sliding_window": 128,
    "compress_ratios": [0, 0] + [2] * 18 + [1] * 20 + [0, 0, 0], "compress_rope_theta": 160000,
    "kv_source_layer_ids": [2, 8, 14, 20], "index_source_layer_ids": [2, 8, 14, 20, 24, 28, 32, 36],
    "index_n_heads": 32, "index_head_dim": 128, "index_topk": 512, "candidate_source_layer_id": 20,
    "candidate_topk_blocks": 2048, "candidate_block_size": 8, "hc_mult": 4, "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6, "engram_layer_ids": [1, 14], "engram_num_embeddings": [384006168, 384016682],
    "engram_max_ngram_size": 4, "engram_vocab_size": 16000000, "engram_n_heads": 8, "engram_head_dim": 256,
    "engram_pad_token_id": 2, "engram_compressed_vocab_size": 99092, "num_nextn_predict_layers": 3,
    "dspark_block_size": 5, "dspark_noise_token_id": 128799, "dspark_target_layer_ids": [37, 38, 39],
    "dspark_markov_rank": 256, "dspark_n_routed_experts": 128, "dspark_num_experts_per_tok": 3,
}
RELEASED = {"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41", "bos_token_id": 0,
            "eos_token_id": 1, "pad_token_id": 2, "image_token_id": 129264, "text_config": RELEASED_TEXT,
            "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                    "weight_block_size": [32, 32], "scale_fmt": "ue8m0", "expert_dtype": "fp4"}}


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Checkpoint:
    return Checkpoint(tiny_checkpoint(name="tiny-v41", root=str(tmp_path_factory.mktemp("v41"))))


def test_released_config_reads_as_the_flash41_preset_and_round_trips():
    cfg = from_dict(RELEASED)
    assert cfg.replace(name="flash41") == preset("flash41")
    assert cfg.is_v41 and cfg.fp8_block == 32 and cfg.n_hash_layers == 0
    again = from_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    assert again.replace(name=cfg.name) == cfg
    written = preset("flash41").to_hf_dict()
    for k, v in RELEASED_TEXT.items():          # every released key is written back with its value
        assert written["text_config"][k] == v, k


def test_config_refuses_a_broken_v41_structure():
    bad = dict(RELEASED, text_config=dict(RELEASED_TEXT, kv_source_layer_ids=[3, 8, 14, 20]))
    with pytest.raises(ValueError, match="kv source"):
        from_dict(bad)
    bad = dict(RELEASED, quantization_config=dict(RELEASED["quantization_config"], weight_block_size=[64, 64]))
    with pytest.raises(ValueError, match="weight_block_size"):
        from_dict(bad)


def test_schema_counts_of_the_release():
    s = checkpoint_schema(preset("flash41"))
    names = list(s)
    count = lambda part: sum(1 for n in names if part in n)   # noqa: E731
    assert count("compressor.wkv.weight") == 4 and count("compressor.wgate.weight") == 3
    assert count("indexer.wq_b.weight") == 8 and count("indexer.wk.weight") == 4
    assert count("engram.embed.weight") == 2 and not any(n.startswith("model.") for n in names)
    assert count(".experts.") == (40 * 384 + 3 * 128) * 6 and not any("hc_head" in n for n in names)
    assert s["layers.0.attn.wq_a.scale"].shape == (40, 160)       # 32x32 blocks of [1280, 5120]
    assert s["layers.1.engram.embed.scale"].shape == (384006168, 8)


def test_kv_cache_accounting_matches_the_release():
    assert global_bytes_per_token(preset("flash41")) == 890.0
    out = subprocess.run([sys.executable, "-m", "dsv4rt", "kv-cache", "--preset", "flash41", "--context", "1M"],
                         capture_output=True, text=True, check=True).stdout
    assert "global cache per token: 890.0 B" in out and "dsv4rt allocates per sequence" in out


def test_checkpoint_tensors_and_dspark_load(ck):
    model = Transformer(ck.cfg, ck, mtp=True)
    assert len(model.mtp) == 2 and "main_proj" in model.mtp[0].extra and "markov_head.head" in model.mtp[1].extra
    t = ck.mapped("layers.0.engram.embed.weight")
    assert t.dtype == torch.uint8 and tuple(t.shape) == (ck.cfg.engram_num_embeddings[0], ck.cfg.engram_head_dim)
    assert torch.equal(t[:3], ck.get("layers.0.engram.embed.weight")[:3].view(torch.uint8))


def test_tokenizer_class_count_must_match(ck, tmp_path):
    from dsv4rt.model.engram import token_classes
    with pytest.raises(CheckpointError, match="engram_compressed_vocab_size"):
        token_classes(ck.cfg.replace(engram_compressed_vocab_size=ck.cfg.engram_compressed_vocab_size + 1), ck, "cpu")


def test_pool_slots_give_what_each_sequence_gives_alone(ck):
    m = Transformer(ck.cfg, ck, dtype=torch.float32, quant=False, precision="fp32")
    pool = KVPool(m, 4 << 20, 400)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 259, (n,), generator=g) for n in (150, 90, 210)]
    alone = []
    for t in seqs:
        c = m.new_cache(1, 400)
        m.forward(t[:-1].view(1, -1), c)
        alone.append(m.forward(t[-1:].view(1, 1), c)[0])
    slots = [pool.alloc() for _ in seqs]
    m.forward_ragged([t[:-1] for t in seqs], [c for _, c in slots])
    out = m.forward_ragged([t[-1:] for t in seqs], [c for _, c in slots])
    for a, b in zip(alone, out):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_run_cli_on_tiny_v41(tmp_path):
    env_cmd = [sys.executable, "-m", "dsv4rt", "run", "--preset", "tiny-v41", "--prompt", "Hello",
               "--max-new-tokens", "4", "--quiet"]
    out = subprocess.run(env_cmd, capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "DSV4RT_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "select_candidate_blocks" in out.stdout and "engram_lookup" in out.stdout


def test_synth_writes_a_loadable_released_format_checkpoint(tmp_path):
    out = tmp_path / "ck"
    res = subprocess.run([sys.executable, "-m", "dsv4rt", "synth", "--preset", "tiny-v41", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v41" and cfg["quantization_config"]["weight_block_size"] == [32, 32]
    assert (out / "tokenizer.json").is_file() and load_config(str(out)).name == "tiny-v41"
    assert len(Checkpoint(str(out)).schema) == len(checkpoint_schema(preset("tiny-v41")))


def test_fp8_wo_a_as_the_release_may_store_it(ck, tmp_path):
    from dsv4rt.formats import dequant_fp8_block, quant_fp8_block
    from dsv4rt.model.checkpoint import write_checkpoint

    tensors = []
    for name in ck.schema:
        t = ck.get(name)
        if name.endswith("attn.wo_a.weight"):
            w8, s = quant_fp8_block(t.float(), 32)
            tensors += [(name, w8), (name[:-len("weight")] + "scale", s.view(torch.float8_e8m0fnu))]
        else:
            tensors.append((name, t))
    out = write_checkpoint(str(tmp_path / "fp8-wo-a"), ck.cfg, tensors)
    ck8 = Checkpoint(out)
    assert ck8.schema["layers.0.attn.wo_a.weight"].dtype == "F8_E4M3"
    model = Transformer(ck8.cfg, ck8, dtype=torch.float32)
    w8, s8 = ck8.get("layers.0.attn.wo_a.weight"), ck8.get("layers.0.attn.wo_a.scale")
    want = dequant_fp8_block(w8, s8, 32, torch.float32)
    assert torch.equal(model.layers[0].attn.wo_a.weight.reshape(want.shape), want)
    logits = model.forward(torch.randint(3, 259, (1, 20)), model.new_cache(1, 64))
    assert torch.isfinite(logits).all()


def test_slice_config_one_rule_for_run_and_synth():
    from dsv4rt.model.runner import slice_config

    v4 = slice_config("flash-slice", 2, 8)      # a 2-layer V4 slice keeps at most 2 hash-routed layers
    assert v4.n_layers == 2 and v4.n_hash_layers == 2 and v4.n_routed_experts == 8
    v41 = slice_config("flash41-slice", 7, 4)
    assert v41.is_v41 and v41.n_layers == 7 and set(v41.layer_kinds()) == {"swa", "csa2"}
