"""A tiny DeepSeek-V4.1 checkpoint in the released format, made by the official model code itself.

The official ``Transformer`` is built at toy sizes with every layer kind (window only; ratio-2 kv source and
reader; ratio-1 kv source that is also the candidate-block source; ratio-1 index source reading inside the
candidate blocks; ratio-1 plain reader; two Engram layers; two DSpark draft blocks), its parameters get seeded
values, and they are written under the official parameter names with the released storage dtypes: FP8 E4M3
weights with E8M0 32x32 scales, FP4 experts as int8 (two E2M1 per byte) with E8M0 per-32 scales, bf16 for the
tensors the official code notes are bf16 in the checkpoint although it holds them in fp32 (``head``, the ratio-2
compressor, the DSpark heads), fp32 for ``attn_sink``, ``hc_*`` and the router bias. The config is the released
nested form; ``tokenizer.json`` is the byte-level tokenizer; ``gate.bias_vl`` (a release tensor that the
text-only official model does not build) is added so the checkpoint has the released tensor set.
"""
from __future__ import annotations

import json
import math
import os
import types
from typing import Any

import torch

import oracle_v41_kernels as K
from oracle_v41_official import FastTokenizer, build, model_args

TINY_TEXT: dict[str, Any] = {
    "model_type": "deepseek_v41_text", "vocab_size": 259, "hidden_size": 256, "moe_intermediate_size": 128,
    "num_hidden_layers": 6, "num_nextn_predict_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 1,
    "head_dim": 128, "qk_rope_head_dim": 64, "q_lora_rank": 128, "o_lora_rank": 128, "o_groups": 2,
    "hidden_act": "silu", "swiglu_limit": 10.0, "rms_norm_eps": 1e-20, "n_routed_experts": 8,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc",
    "norm_topk_prob": True, "routed_scaling_factor": 1.5, "sliding_window": 128,
    "compress_ratios": [0, 2, 2, 1, 1, 1, 0, 0], "compress_rope_theta": 160000, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 16, "beta_fast": 32, "beta_slow": 1,
                     "original_max_position_embeddings": 65536},
    "kv_source_layer_ids": [1, 3], "index_source_layer_ids": [1, 3, 4], "index_n_heads": 16, "index_head_dim": 128,
    "index_topk": 16, "candidate_source_layer_id": 3, "candidate_topk_blocks": 4, "candidate_block_size": 8,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "engram_layer_ids": [0, 4], "engram_max_ngram_size": 4,
    "engram_vocab_size": 1000, "engram_n_heads": 2, "engram_head_dim": 64, "engram_pad_token_id": 2,
    "dspark_block_size": 5, "dspark_noise_token_id": 258, "dspark_target_layer_ids": [3, 4, 5],
    "dspark_markov_rank": 32, "dspark_n_routed_experts": 4, "dspark_num_experts_per_tok": 2,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
}
FP32_STORED = ("attn_sink", "gate.bias", "hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn",
               "hc_ffn_base", "hc_ffn_scale")


def released_config(text: dict[str, Any]) -> dict[str, Any]:
    return {"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41", "dtype": "bfloat16",
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "text_config": dict(text),
            "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic",
                                    "weight_block_size": [32, 32], "scale_fmt": "ue8m0", "expert_dtype": "fp4"}}


def _engram_fields(official: types.ModuleType, text: dict[str, Any], tokenizer_json: str) -> dict[str, Any]:
    """engram_num_embeddings (the sum of each layer's primes) and engram_compressed_vocab_size (the official
    token map's class count), from the official engram module."""
    eng = official.EngramLayout
    args = official.ModelArgs(engram_layer_ids=tuple(text["engram_layer_ids"]),
                              engram_max_ngram_size=text["engram_max_ngram_size"],
                              engram_vocab_size=text["engram_vocab_size"], engram_n_heads=text["engram_n_heads"],
                              engram_head_dim=text["engram_head_dim"], engram_num_embeddings=())
    layout = eng.from_args(args)
    rows = [sum(p for per_n in layer for p in per_n) for layer in layout.primes]
    mod = __import__(eng.__module__, fromlist=["build_compressed_token_map"])
    _, classes = mod.build_compressed_token_map(FastTokenizer(tokenizer_json))
    return {"engram_num_embeddings": rows, "engram_compressed_vocab_size": classes}


def _fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [out, in] -> E4M3 weight and E8M0 scales per 32x32 block (power-of-two, amax to 448)."""
    o, i = w.shape
    pad = torch.zeros(math.ceil(o / 32) * 32, math.ceil(i / 32) * 32)
    pad[:o, :i] = w
    blocks = pad.unflatten(0, (-1, 32)).unflatten(2, (-1, 32))             # [ob, 32, ib, 32]
    s = K._pow2_ceil(blocks.abs().amax((1, 3)).clamp_min(1e-30) / 448.0)  # [ob, ib]
    q = (blocks / s[:, None, :, None]).clamp(-448, 448).flatten(2).flatten(0, 1)[:o, :i]
    return q.to(torch.float8_e4m3fn), s.to(torch.float8_e8m0fnu)


def _values(name: str, p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Seeded fp32 values for parameter ``name`` of logical shape ``shape`` (scaled to keep activations sane)."""
    shape = p.shape if p.dtype != torch.float4_e2m1fn_x2 else (p.shape[0], p.shape[1] * 2)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("norm.weight") or leaf in ("q_weight", "k_weight"):
        return 1 + 0.1 * r(*shape)
    if leaf == "attn_sink":
        return r(*shape)
    if leaf in ("hc_attn_fn", "hc_ffn_fn"):
        return r(*shape) * (0.5 / math.sqrt(shape[1]))
    if leaf in ("hc_attn_base", "hc_ffn_base"):
        return 0.5 * r(*shape)
    if leaf in ("hc_attn_scale", "hc_ffn_scale"):
        return 0.5 + torch.rand(*shape, generator=g)
    if name.endswith("gate.bias"):
        return 0.1 * r(*shape)
    if name == "embed.weight" or name.endswith("markov_head.embed.weight") or ".engram.embed." in name:
        return r(*shape)
    return r(*shape) / math.sqrt(shape[-1])


def make_tiny(official: types.ModuleType, out_dir: str, seed: int = 0,
              text: dict[str, Any] | None = None) -> list[tuple[str, tuple[int, ...], str]]:
    """Write config.json, tokenizer.json and the safetensors of a tiny checkpoint into ``out_dir``; returns
    (name, shape, safetensors dtype) of every tensor written."""
    from safetensors.torch import save_file

    from dsv4rt.model.engram_map import write_byte_tokenizer_json

    os.makedirs(out_dir, exist_ok=True)
    tok = write_byte_tokenizer_json(out_dir)
    text = dict(text or TINY_TEXT)
    text.update(_engram_fields(official, text, tok))
    config = released_config(text)
    args, _ = model_args(official, config, max_seq_len=64)
    model = build(official, args, tok, "release")
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.endswith(".scale") and name[:-6] + ".weight" in params:
            continue                                                   # written with its weight
        v = _values(name, p, g)
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        if p.dtype == torch.float8_e4m3fn and name.endswith(".engram.embed.weight"):
            q, s = K.act_quant(v.to(torch.bfloat16), 32, "ue8m0", torch.float8_e8m0fnu)
            out[name], out[base + ".scale"] = q, s
        elif p.dtype == torch.float8_e4m3fn:
            out[name], out[base + ".scale"] = _fp8(v)
        elif p.dtype == torch.float4_e2m1fn_x2:
            q, s = K.fp4_act_quant(v.to(torch.bfloat16), 32, False, torch.float8_e8m0fnu)
            out[name], out[base + ".scale"] = q.view(torch.int8), s
        elif any(name.endswith(k) for k in FP32_STORED):
            out[name] = v.float()
        else:
            out[name] = v.to(torch.bfloat16)
    for name in list(out):
        if name.endswith(".ffn.gate.bias"):
            out[name + "_vl"] = 0.1 * torch.randn(out[name].shape, generator=g)
    shard = "model-00001-of-00001.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, shard))
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: shard for k in sorted(out)}}, f, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    names = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e8m0fnu: "F8_E8M0", torch.int8: "I8",
             torch.bfloat16: "BF16", torch.float32: "F32"}
    return [(k, tuple(v.shape), names[v.dtype]) for k, v in out.items()]
