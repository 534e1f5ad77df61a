"""DeepSeek-V4.1 configuration: the released ``config.json`` (nested ``text_config``, ``quantization_config``
with ``weight_block_size [32, 32]``), its writer, the structural checks of the V4.1 fields and the presets
``flash41`` (the release), ``tiny-v41`` (every layer kind at toy sizes) and ``flash41-slice`` (V4.1-Flash
widths, a few layers). Spec: deepseek-v41.md sections 3.1-3.2.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from .config import _HF_NAMES, _ROPE_SCALING, ModelConfig

__all__ = ["ARCH_V41", "is_v41_dict", "from_hf_v41", "to_hf_dict_v41", "validate_v41", "V41_PRESETS"]

ARCH_V41 = "deepseek_v41"
QUANT_V41 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32],
             "scale_fmt": "ue8m0", "expert_dtype": "fp4"}

# reference field -> text_config key, for the fields V4 does not have (or spells differently in V4.1)
_V41_NAMES = {
    "kv_source_layers": "kv_source_layer_ids", "index_source_layers": "index_source_layer_ids",
    "candidate_source_layer": "candidate_source_layer_id", "candidate_topk_blocks": "candidate_topk_blocks",
    "candidate_block_size": "candidate_block_size", "engram_layer_ids": "engram_layer_ids",
    "engram_num_embeddings": "engram_num_embeddings", "engram_max_ngram_size": "engram_max_ngram_size",
    "engram_vocab_size": "engram_vocab_size", "engram_n_heads": "engram_n_heads",
    "engram_head_dim": "engram_head_dim", "engram_pad_id": "engram_pad_token_id",
    "engram_compressed_vocab_size": "engram_compressed_vocab_size", "dspark_block_size": "dspark_block_size",
    "dspark_noise_token_id": "dspark_noise_token_id", "dspark_target_layer_ids": "dspark_target_layer_ids",
    "dspark_markov_rank": "dspark_markov_rank", "dspark_n_routed_experts": "dspark_n_routed_experts",
    "dspark_n_activated_experts": "dspark_num_experts_per_tok",
}
_TEXT_NAMES = {k: v for k, v in _HF_NAMES.items() if k not in ("n_hash_layers", "bos_token_id", "eos_token_id")}
_TEXT_NAMES.update(_V41_NAMES)
_ROOT_NAMES = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id"}


def is_v41_dict(d: Mapping[str, Any]) -> bool:
    """Whether a config dict is V4.1's (top level ``model_type``, a nested ``text_config``, or an inference
    config with V4.1-only keys)."""
    return (d.get("model_type") in (ARCH_V41, "deepseek_v41_text") or isinstance(d.get("text_config"), Mapping)
            or "kv_source_layers" in d or "candidate_source_layer" in d)


def from_hf_v41(d: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from the released V4.1 top-level ``config.json`` (or its ``text_config`` alone)."""
    text = d.get("text_config", d)
    if not isinstance(text, Mapping):
        raise ValueError(f"config.json: text_config must be an object, got {type(text).__name__}")
    q = d.get("quantization_config") or text.get("quantization_config")
    block = 32
    if q is not None:
        wbs = q.get("weight_block_size", [32, 32])
        if list(wbs) not in ([32, 32], [128, 128]) or q.get("scale_fmt", "ue8m0") != "ue8m0" \
                or q.get("quant_method", "fp8") != "fp8":
            raise ValueError(f"config.json: quantization_config {dict(q)} is not a released format "
                             f"(fp8, ue8m0 scales, weight_block_size [32, 32])")
        block = int(wbs[0])
    kw: dict[str, Any] = {ref: text[k] for ref, k in _TEXT_NAMES.items() if k in text}
    kw.update({ref: d.get(k, text.get(k)) for ref, k in _ROOT_NAMES.items() if k in d or k in text})
    rs = text.get("rope_scaling") or {}
    if rs and rs.get("type", rs.get("rope_type", "yarn")) != "yarn":
        raise ValueError(f"config.json: rope_scaling type {rs.get('type')!r} (V4.1 uses yarn)")
    kw.update({ref: rs[k] for k, ref in _ROPE_SCALING.items() if k in rs})
    for f in ("compress_ratios",):
        if f in text:
            kw[f] = tuple(text[f])
    expert = (q or {}).get("expert_dtype", text.get("expert_dtype", "fp4"))
    kw.update(arch=ARCH_V41, fp8_block=block, n_hash_layers=0, expert_dtype=expert)
    if isinstance(d.get("dsv4rt"), Mapping):
        kw["extra"] = dict(d["dsv4rt"])
        if "preset" in kw["extra"]:
            kw["name"] = str(kw["extra"]["preset"])
    kw.setdefault("name", str(d.get("_name_or_path", "hf-v41")))
    kw.update(overrides)
    return ModelConfig(**kw)


def to_hf_dict_v41(cfg: ModelConfig) -> dict[str, Any]:
    """The released top-level ``config.json`` of a V4.1 config (no ``vision_config``: text model only)."""
    text: dict[str, Any] = {"model_type": "deepseek_v41_text"}
    for ref, k in _TEXT_NAMES.items():
        v = getattr(cfg, ref)
        text[k] = list(v) if isinstance(v, tuple) else v
    text["compress_ratios"] = list(cfg.compress_ratios)
    text["rope_scaling"] = {"type": "yarn", "factor": cfg.rope_factor, "beta_fast": cfg.beta_fast,
                            "beta_slow": cfg.beta_slow, "original_max_position_embeddings": cfg.original_seq_len}
    text.update(num_key_value_heads=1, hidden_act="silu", attention_bias=False, attention_dropout=0.0,
                topk_method="noaux_tc", norm_topk_prob=True, tie_word_embeddings=False, use_cache=True,
                initializer_range=0.02)
    d: dict[str, Any] = {"architectures": ["DeepseekV41ForCausalLM"], "model_type": ARCH_V41, "dtype": "bfloat16",
                         "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                         "pad_token_id": cfg.engram_pad_id, "text_config": text,
                         "quantization_config": dict(QUANT_V41, weight_block_size=[cfg.fp8_block] * 2,
                                                     expert_dtype=cfg.expert_dtype)}
    if cfg.extra:
        d["dsv4rt"] = dict(cfg.extra)
    return d


def validate_v41(cfg: ModelConfig, need: Callable[[bool, str], None]) -> None:
    """The V4.1 structure: who compresses, who indexes, candidate blocks, Engram and DSpark fields."""
    need(cfg.arch in ("deepseek_v4", ARCH_V41), f"arch {cfg.arch!r} (deepseek_v4 or {ARCH_V41})")
    need(cfg.fp8_block in (32, 128), f"fp8_block must be 32 or 128, got {cfg.fp8_block}")
    if not cfg.is_v41:
        return
    n = cfg.n_layers
    ratios = cfg.compress_ratios[:n]
    need(cfg.n_hash_layers == 0, "V4.1 has no hash-routed layers (n_hash_layers must be 0)")
    need(all(r in (0, 1, 2) for r in cfg.compress_ratios), f"V4.1 compress_ratios are 0, 1 or 2, got {ratios}")
    need(cfg.head_dim % 32 == 0, "head_dim must be a multiple of 32 (the FP8 window and FP4 KV blocks)")
    for f in ("kv_source_layers", "index_source_layers"):
        bad = [i for i in getattr(cfg, f) if not (0 <= i < n and ratios[i] > 0)]
        need(not bad, f"{f} {list(getattr(cfg, f))}: layers {bad} are not compressed backbone layers")
    need(set(cfg.kv_source_layers) <= set(cfg.index_source_layers),
         "every kv source layer must also be an index source (its indexer owns the index keys)")
    for i, r in enumerate(ratios):
        if r:
            src = [j for j in cfg.kv_source_layers if j <= i]
            need(bool(src) and ratios[max(src)] == r, f"layer {i} (ratio {r}) has no kv source layer of the same "
                 f"ratio at or before it (kv_source_layers {list(cfg.kv_source_layers)})")
            need(any(j <= i for j in cfg.index_source_layers), f"layer {i} has no index source at or before it")
    c = cfg.candidate_source_layer
    if c >= 0:
        need(c in cfg.index_source_layers, f"candidate_source_layer {c} must be an index source layer")
        need(cfg.candidate_topk_blocks > 0 and cfg.candidate_block_size > 0,
             "candidate_topk_blocks and candidate_block_size must be > 0 with a candidate source layer")
    e = cfg.engram_layer_ids
    if e:
        need(all(0 <= i < n for i in e), f"engram_layer_ids {list(e)} must be backbone layers")
        need(len(cfg.engram_num_embeddings) == len(e), "engram_num_embeddings needs one entry per Engram layer")
        need(cfg.engram_max_ngram_size >= 2 and cfg.engram_n_heads > 0 and cfg.engram_vocab_size > 1,
             "Engram needs engram_max_ngram_size >= 2, engram_n_heads > 0 and engram_vocab_size > 1")
        need(cfg.engram_head_dim > 0 and cfg.engram_head_dim % 32 == 0, "engram_head_dim must be a multiple of 32")
        need(cfg.engram_compressed_vocab_size > 0, "engram_compressed_vocab_size must be > 0")
    if cfg.n_mtp_layers:
        need(cfg.dspark_block_size > 0 and bool(cfg.dspark_target_layer_ids),
             "V4.1 draft blocks (n_mtp_layers > 0) need dspark_block_size > 0 and dspark_target_layer_ids")
        need(all(0 <= i < n for i in cfg.dspark_target_layer_ids), "dspark_target_layer_ids must be backbone layers")
        need(all(r == 0 for r in cfg.compress_ratios[n:]), "DSpark layers are window-only (ratio 0)")


def _flash41() -> ModelConfig:
    return ModelConfig(
        name="flash41", arch=ARCH_V41, fp8_block=32, dim=5120, n_layers=40, n_mtp_layers=3, n_heads=64,
        q_lora_rank=1280, compress_ratios=(0, 0) + (2,) * 18 + (1,) * 20 + (0, 0, 0), index_n_heads=32,
        n_routed_experts=384, n_hash_layers=0, moe_inter_dim=2304, norm_eps=1e-20,
        kv_source_layers=(2, 8, 14, 20), index_source_layers=(2, 8, 14, 20, 24, 28, 32, 36),
        candidate_source_layer=20, candidate_topk_blocks=2048, candidate_block_size=8, engram_layer_ids=(1, 14),
        engram_num_embeddings=(384006168, 384016682), engram_max_ngram_size=4, engram_vocab_size=16000000,
        engram_n_heads=8, engram_head_dim=256, engram_pad_id=2, engram_compressed_vocab_size=99092,
        dspark_block_size=5, dspark_noise_token_id=128799, dspark_target_layer_ids=(37, 38, 39),
        dspark_markov_rank=256, dspark_n_routed_experts=128, dspark_n_activated_experts=3)


TINY_V41_COMPRESSED_VOCAB = 230
"""Classes of the byte-level vocabulary under the Engram normaliser (checked against the map in the tests)."""


def _tiny_v41() -> ModelConfig:
    """Toy sizes, every V4.1 layer kind: 0 window only (+ Engram), 1 ratio-2 kv / index source, 2 ratio-2
    reader, 3 ratio-1 source and candidate-block source, 4 ratio-1 index source inside the candidate blocks
    (+ Engram), 5 ratio-1 reader; two DSpark blocks. The released 128-token window; 8-position candidate
    blocks, 4 kept, top-16 entries, so a 300-token prompt exercises every level. 16 index heads: with 4, one
    score in 16 is exactly 0 (every head's ReLU clips) and such ties make the top-k implementation-defined."""
    from ..engram_tables import engram_tables
    tables = engram_tables((0, 4), 4, 2, 1000, TINY_V41_COMPRESSED_VOCAB)
    return ModelConfig(
        name="tiny-v41", arch=ARCH_V41, fp8_block=32, vocab_size=259, dim=256, n_layers=6, n_mtp_layers=2,
        n_heads=8, head_dim=128, q_lora_rank=128, o_groups=2, o_lora_rank=128,
        compress_ratios=(0, 2, 2, 1, 1, 1, 0, 0), index_n_heads=16, index_topk=16, n_routed_experts=8,
        n_activated_experts=2, n_hash_layers=0, moe_inter_dim=128, norm_eps=1e-20,
        kv_source_layers=(1, 3), index_source_layers=(1, 3, 4), candidate_source_layer=3, candidate_topk_blocks=4,
        candidate_block_size=8, engram_layer_ids=(0, 4), engram_num_embeddings=tuple(t.rows for t in tables),
        engram_max_ngram_size=4, engram_vocab_size=1000, engram_n_heads=2, engram_head_dim=64, engram_pad_id=2,
        engram_compressed_vocab_size=TINY_V41_COMPRESSED_VOCAB, dspark_block_size=5, dspark_noise_token_id=258,
        dspark_target_layer_ids=(3, 4, 5), dspark_markov_rank=32, dspark_n_routed_experts=4,
        dspark_n_activated_experts=2, extra={"tokenizer": "bytes", "preset": "tiny-v41"})


def _flash41_slice(n_layers: int = 6) -> ModelConfig:
    """V4.1-Flash widths with the layer kinds of the release in ``n_layers`` (default 6) layers: window,
    window + Engram, a ratio-2 source and reader, the ratio-1 candidate source and a level-2 index source.
    The Engram table is cut to a 20,000-bucket vocabulary (2.4 M rows instead of 384 M), and its token classes
    are the byte tokenizer's (the synthetic presets' tokenizer), not the release's 99,092."""
    from ..engram_tables import engram_tables
    if n_layers < 6:
        raise ValueError(f"flash41-slice needs at least 6 layers (every V4.1 layer kind), got {n_layers}")
    ratios = (0, 0, 2, 2, 1, 1) + (1,) * (n_layers - 6)
    tables = engram_tables((1,), 4, 8, 20000, TINY_V41_COMPRESSED_VOCAB)
    return _flash41().replace(
        name="flash41-slice", n_layers=n_layers, n_mtp_layers=0, compress_ratios=ratios,
        kv_source_layers=(2, 4), index_source_layers=(2, 4, 5), candidate_source_layer=4, engram_layer_ids=(1,),
        engram_num_embeddings=tuple(t.rows for t in tables), engram_vocab_size=20000, dspark_target_layer_ids=(),
        engram_compressed_vocab_size=TINY_V41_COMPRESSED_VOCAB,
        extra={"tokenizer": "bytes", "preset": "flash41-slice"})


V41_PRESETS = {"flash41": _flash41, "tiny-v41": _tiny_v41, "flash41-slice": _flash41_slice}
