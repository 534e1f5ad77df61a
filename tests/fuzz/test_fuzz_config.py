"""Seeded fuzzing of config.json: every bad value of every numeric field gives a CheckpointError naming the
field (as the file spells it), what was expected and what came; never a ZeroDivisionError, IndexError or a
model producing NaN logits later."""
from __future__ import annotations

import json
import math
import random

import pytest

from dsv4rt.errors import CheckpointError
from dsv4rt.model.config import load_config, preset

_POSITIVE = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank",
             "o_groups", "o_lora_rank", "index_n_heads", "index_topk", "n_routed_experts", "moe_intermediate_size",
             "hc_mult", "max_position_embeddings", "routed_scaling_factor", "rope_theta", "compress_rope_theta",
             "hc_eps", "rms_norm_eps", "rope_scaling.factor"]
_NON_NEGATIVE = ["swiglu_limit", "hc_sinkhorn_iters", "num_hash_layers", "num_nextn_predict_layers"]
_TOKEN = ["bos_token_id", "eos_token_id"]
_WRONG_TYPE = ["256", None, True, [1], {"a": 1}]


def _cases(rng: random.Random, vocab: int) -> list[tuple[str, object]]:
    cases = [(f, v) for f in _POSITIVE for v in (0, -1, -rng.randint(2, 1 << 20), math.nan, math.inf)]
    cases += [(f, v) for f in _NON_NEGATIVE for v in (-1, -rng.randint(2, 1 << 20), math.nan)]
    cases += [(f, v) for f in _TOKEN for v in (-1, vocab, vocab + rng.randint(1, 1000))]
    cases += [(f, v) for f in _POSITIVE + _NON_NEGATIVE + _TOKEN for v in _WRONG_TYPE]
    return cases


def _set(d: dict, field: str, value: object) -> None:
    if field.startswith("rope_scaling."):
        d["rope_scaling"] = dict(d["rope_scaling"], **{field.split(".", 1)[1]: value})
    else:
        d[field] = value


def test_every_bad_field_is_named(tmp_path, fuzz_full):
    base = preset("tiny").to_hf_dict()
    cases = _cases(random.Random(0), base["vocab_size"])
    if not fuzz_full:
        cases = random.Random(1).sample(cases, 60)
    for field, value in cases:
        d = json.loads(json.dumps(base))
        _set(d, field, value)
        path = tmp_path / "config.json"
        path.write_text(json.dumps(d))
        with pytest.raises(CheckpointError) as err:
            load_config(path)
        msg = str(err.value)
        assert field in msg and repr(value) in msg and "config.json" in msg, (field, value, msg)


def test_valid_values_still_load(tmp_path):
    rng = random.Random(2)
    for _ in range(20):
        d = preset("tiny").to_hf_dict()
        d["rms_norm_eps"] = 10 ** rng.uniform(-8, -3)
        d["swiglu_limit"] = rng.choice([0, 7.0, 10])
        d["eos_token_id"] = rng.randrange(d["vocab_size"])
        d["rope_scaling"]["factor"] = rng.uniform(1, 40)
        (tmp_path / "config.json").write_text(json.dumps(d))
        cfg = load_config(tmp_path / "config.json")
        assert cfg.eos_token_id == d["eos_token_id"] and cfg.norm_eps == d["rms_norm_eps"]
