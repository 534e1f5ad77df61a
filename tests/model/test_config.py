"""Config readers on the released configs, presets, and the checkpoint schema derived from them."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from dsv4rt.errors import CheckpointError
from dsv4rt.model.config import CSA, HCA, SWA, from_hf, from_inference, load_config, preset
from dsv4rt.model.schema import checkpoint_schema

# copies of the released configs (shared/reference: HF config.json and inference/config.json of both models)
REF = os.path.join(os.path.dirname(__file__), "data")
needs_ref = pytest.mark.skipif(not os.path.isdir(REF), reason="released configs not present")


def _json(name):
    with open(os.path.join(REF, name)) as f:
        return json.load(f)


def _fields(cfg):
    d = cfg.to_inference_dict()
    d.pop("max_seq_len")
    return d


@needs_ref
@pytest.mark.parametrize("model", ["flash", "pro"])
def test_both_spellings_read_to_the_preset(model):
    hf = from_hf(_json(f"deepseek-v4-{model}.config.json"))
    inf = from_inference(_json(f"deepseek-v4-{model}.inference-config.json"))
    assert _fields(hf) == _fields(preset(model)) == _fields(inf)


@needs_ref
def test_released_values():
    flash = from_hf(_json("deepseek-v4-flash.config.json"))
    pro = from_inference(_json("deepseek-v4-pro.inference-config.json"))
    assert (flash.dim, flash.n_layers, flash.n_heads, flash.index_topk, flash.route_scale) == (4096, 43, 64, 512, 1.5)
    assert (pro.dim, pro.n_layers, pro.n_heads, pro.index_topk, pro.route_scale) == (7168, 61, 128, 1024, 2.5)
    assert len(flash.compress_ratios) == 44 and len(pro.compress_ratios) == 62
    assert flash.layer_kinds().count(SWA) == 2 and flash.layer_kinds().count(CSA) == 21
    assert flash.layer_kinds().count(HCA) == 20
    assert pro.layer_kinds().count(CSA) == 30 and pro.layer_kinds().count(HCA) == 31
    assert flash.kind(43) == SWA and pro.kind(61) == SWA          # the MTP blocks
    assert (flash.rope_factor, flash.original_seq_len, flash.compress_rope_theta) == (16, 65536, 160000)
    assert flash.expert_dtype == "fp4"                          # absent from the HF file: fp4 as vLLM


@needs_ref
def test_checkpoint_dir_reads_config_and_inference_config(tmp_path):
    shutil.copy(os.path.join(REF, "deepseek-v4-flash.config.json"), tmp_path / "config.json")
    (tmp_path / "inference").mkdir()
    d = _json("deepseek-v4-flash.inference-config.json")
    d["expert_dtype"] = "fp8"
    (tmp_path / "inference" / "config.json").write_text(json.dumps(d))
    assert load_config(tmp_path).expert_dtype == "fp8"


def test_schema_counts_match_the_released_checkpoints():
    assert len(checkpoint_schema(preset("flash"))) == 69187
    assert len(checkpoint_schema(preset("pro"))) == 145116


def test_schema_shapes_and_dtypes():
    s = checkpoint_schema(preset("pro"))
    assert s["layers.5.ffn.experts.383.w1.weight"].shape == (3072, 3584)
    assert s["layers.5.ffn.experts.383.w1.weight"].dtypes == ("I8",)
    assert s["layers.5.ffn.experts.0.w2.scale"].shape == (7168, 96)
    assert s["layers.5.ffn.experts.0.w2.scale"].dtype == "F8_E8M0"
    assert s["layers.0.attn.wq_b.scale"].shape == (512, 12)
    assert s["layers.0.attn.wo_a.weight"].shape == (16384, 4096)
    assert s["layers.0.attn.compressor.ape"].shape == (128, 512)
    assert s["layers.2.attn.compressor.ape"].shape == (4, 1024)
    assert s["layers.2.attn.indexer.wq_b.weight"].shape == (8192, 1536)
    assert s["layers.0.ffn.gate.tid2eid"].dtypes == ("I64", "I32")
    assert "layers.3.ffn.gate.tid2eid" not in s and s["layers.3.ffn.gate.bias"].shape == (384,)
    assert s["mtp.0.e_proj.scale"].shape == (56, 56) and s["mtp.0.ffn.gate.bias"].dtype == "F32"
    assert s["layers.0.ffn.shared_experts.w1.scale"].shape == (24, 56)
    f = checkpoint_schema(preset("flash"))
    assert "layers.0.attn.compressor.ape" not in f and "layers.3.attn.indexer.wq_b.weight" not in f


def test_tiny_has_every_layer_kind_and_both_routings():
    t = preset("tiny")
    assert set(t.layer_kinds()) == {SWA, CSA, HCA}
    assert any(t.is_hash(i) for i in range(t.n_layers)) and not all(t.is_hash(i) for i in range(t.n_layers))
    assert t.window_size == 128 and {t.ratio(i) for i in range(t.n_layers)} == {0, 4, 128}
    assert t.dim % 128 == 0 and t.expert_dtype == "fp4"


def test_round_trip_through_hf_spelling():
    for name in ("tiny", "flash", "pro"):
        cfg = preset(name)
        assert _fields(from_hf(cfg.to_hf_dict())) == _fields(cfg)


def test_invalid_configs(tmp_path):
    with pytest.raises(ValueError, match="compress_ratios"):
        preset("tiny", compress_ratios=(0, 4))
    with pytest.raises(ValueError, match="o_groups"):
        preset("tiny", o_groups=3)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_config(tmp_path)


@needs_ref
@pytest.mark.parametrize("model", ["flash", "pro"])
@pytest.mark.parametrize("written", ["same model", "tiny", "flash-slice"])
def test_written_config_has_every_released_key(model, written):
    """A preset's config.json carries every key of the released one (hidden_act, norm_topk_prob, topk_method,
    ...), so peers that read the released file (vLLM, llama.cpp's converter) read ours unchanged; for the
    released model itself every value is the released one too."""
    released = _json(f"deepseek-v4-{model}.config.json")
    d = preset(model if written == "same model" else written).to_hf_dict()
    assert sorted(set(released) - set(d)) == []
    # keys we write beyond the release: the expert dtype (the Pro file has it too) and dsv4rt's own notes
    assert set(d) - set(released) <= {"expert_dtype", "dsv4rt"}
    if written == "same model":
        assert {k: d[k] for k in released} == released
    else:
        same = ("hidden_act", "norm_topk_prob", "topk_method", "num_key_value_heads", "attention_bias",
                "scoring_func", "tie_word_embeddings", "quantization_config", "architectures", "model_type")
        assert {k: d[k] for k in same} == {k: released[k] for k in same}
