"""ModelConfig: DeepSeek-V4 hyper-parameters under the reference (``inference/config.json``) names.

Readers for the two released spellings (spec section 7): the HF top-level ``config.json``
(``hidden_size``, ``num_hidden_layers``, ``rope_scaling``...) and ``inference/config.json`` (``dim``,
``n_layers``...). Presets: ``flash`` and ``pro`` (the released values), ``tiny`` (the same structure at
toy sizes, the embedded default) and ``flash-slice`` (V4-Flash widths, a few layers, for GPU runs).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import CheckpointError

__all__ = ["ModelConfig", "PRESETS", "preset", "from_hf", "from_inference", "from_dict", "load_config",
           "layer_kind", "SWA", "CSA", "HCA", "CSA2"]

SWA, CSA, HCA, CSA2 = "swa", "csa", "hca", "csa2"


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter the model needs; field names follow the reference ``ModelArgs``."""

    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    n_mtp_layers: int = 1
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    n_hash_layers: int = 3
    moe_inter_dim: int = 2048
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    score_func: str = "sqrtsoftplus"
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: int = 32
    beta_slow: int = 1
    expert_dtype: str = "fp4"
    bos_token_id: int = 0
    eos_token_id: int = 1
    max_position_embeddings: int = 1048576
    max_seq_len: int = 4096
    # DeepSeek-V4.1 (spec deepseek-v41.md; the V4 defaults below switch every V4.1 feature off)
    arch: str = "deepseek_v4"
    fp8_block: int = 128
    kv_source_layers: tuple[int, ...] = ()
    index_source_layers: tuple[int, ...] = ()
    candidate_source_layer: int = -1
    candidate_topk_blocks: int = 0
    candidate_block_size: int = 0
    engram_layer_ids: tuple[int, ...] = ()
    engram_num_embeddings: tuple[int, ...] = ()
    engram_max_ngram_size: int = 4
    engram_vocab_size: int = 0
    engram_n_heads: int = 0
    engram_head_dim: int = 0
    engram_pad_id: int = 2
    engram_compressed_vocab_size: int = 0
    dspark_block_size: int = 0
    dspark_noise_token_id: int = 0
    dspark_target_layer_ids: tuple[int, ...] = ()
    dspark_markov_rank: int = 256
    dspark_n_routed_experts: int = 0
    dspark_n_activated_experts: int = 0
    name: str = "custom"
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _check_types(self)
        for f in _TUPLES:
            object.__setattr__(self, f, tuple(getattr(self, f)))
        self.validate()

    # ---- derived ---------------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def mix_hc(self) -> int:
        """Rows of an mHC projection: pre (hc) + post (hc) + comb (hc * hc)."""
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def is_v41(self) -> bool:
        return self.arch == "deepseek_v41"

    def ratio(self, layer: int) -> int:
        """Compress ratio of layer ``layer`` (``n_layers + i`` is MTP block i)."""
        return self.compress_ratios[min(layer, len(self.compress_ratios) - 1)]

    def kind(self, layer: int) -> str:
        if self.is_v41:   # ratio 2 / 1 with a shared indexer (CSA2), or window only
            return SWA if self.ratio(layer) == 0 else CSA2
        return layer_kind(self.ratio(layer))

    def experts_of(self, layer: int) -> tuple[int, int]:
        """(routed experts, experts per token) of a layer (V4.1's DSpark blocks have their own)."""
        if layer >= self.n_layers and self.dspark_n_routed_experts:
            return self.dspark_n_routed_experts, self.dspark_n_activated_experts or self.n_activated_experts
        return self.n_routed_experts, self.n_activated_experts

    def is_hash(self, layer: int) -> bool:
        return layer < self.n_hash_layers

    def layer_kinds(self) -> list[str]:
        return [self.kind(i) for i in range(self.n_layers)]

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_inference_dict(self) -> dict[str, Any]:
        """The ``inference/config.json`` spelling (plus bos/eos, n_mtp_layers and max_seq_len)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "name")}
        d["compress_ratios"] = list(self.compress_ratios)
        d["dtype"], d["scale_fmt"] = "fp8", "ue8m0"
        return d

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF top-level ``config.json`` spelling (what the checkpoint writer stores)."""
        if self.is_v41:
            from .config_v41 import to_hf_dict_v41
            return to_hf_dict_v41(self)
        d: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"}
        for ref, hf in _HF_NAMES.items():
            d[hf] = getattr(self, ref)
        d["compress_ratios"] = list(self.compress_ratios)
        d["rope_scaling"] = {"type": "yarn", "factor": self.rope_factor, "beta_fast": self.beta_fast,
                             "beta_slow": self.beta_slow,
                             "original_max_position_embeddings": self.original_seq_len}
        d["num_key_value_heads"] = 1
        d.update(_HF_FIXED)
        d["quantization_config"] = dict(_QUANT)
        d["expert_dtype"] = self.expert_dtype
        d["torch_dtype"] = "bfloat16"
        if self.extra:
            d["dsv4rt"] = dict(self.extra)
        return d

    def validate(self) -> None:
        """Raise ValueError naming the field when a block constraint of the formats or ops breaks."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig({self.name}): {msg}")
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_groups",
                    "o_lora_rank", "index_n_heads", "index_topk", "n_routed_experts", "moe_inter_dim", "hc_mult",
                    "max_position_embeddings", "original_seq_len", "route_scale", "rope_theta",
                    "compress_rope_theta", "rope_factor", "hc_eps", "norm_eps")
        for f in positive:  # written so that NaN fails too
            v = getattr(self, f)
            need(v > 0 and math.isfinite(v), f"{f} must be a finite number > 0, got {v!r}")
        for f in ("n_mtp_layers", "n_hash_layers", "swiglu_limit", "hc_sinkhorn_iters", "beta_fast", "beta_slow"):
            v = getattr(self, f)
            need(v >= 0 and math.isfinite(v), f"{f} must be a finite number >= 0, got {v!r}")
        for f in ("bos_token_id", "eos_token_id"):
            v = getattr(self, f)
            need(0 <= v < self.vocab_size, f"{f} must be a token id in [0, vocab_size = {self.vocab_size}), got {v}")
        need(len(self.compress_ratios) in (self.n_layers, self.n_layers + self.n_mtp_layers),
             f"compress_ratios has {len(self.compress_ratios)} entries, expected n_layers + n_mtp_layers = "
             f"{self.n_layers + self.n_mtp_layers}")
        need(all(r >= 0 for r in self.compress_ratios), "compress_ratios must be >= 0")
        need(self.rope_head_dim % 2 == 0 and 0 < self.rope_head_dim < self.head_dim,
             "rope_head_dim must be even and smaller than head_dim")
        need(self.nope_head_dim % 64 == 0, "head_dim - rope_head_dim must be a multiple of 64 (FP8 KV block)")
        need(self.o_groups > 0, f"o_groups must be an integer > 0, got {self.o_groups}")
        need(self.n_heads % self.o_groups == 0, "n_heads must be a multiple of o_groups")
        need(self.dim % 32 == 0 and self.moe_inter_dim % 32 == 0, "dim and moe_inter_dim must be multiples of 32")
        ihd = self.index_head_dim
        need(ihd % 32 == 0 and ihd & (ihd - 1) == 0 and ihd > self.rope_head_dim,
             "index_head_dim must be a power of two, a multiple of 32 and larger than rope_head_dim")
        need(0 < self.n_activated_experts <= self.n_routed_experts, "n_activated_experts out of range")
        need(self.n_shared_experts in (0, 1), "n_shared_experts must be 0 or 1")
        need(self.score_func == "sqrtsoftplus", f"score_func {self.score_func!r} (only sqrtsoftplus exists in V4)")
        need(self.expert_dtype in ("fp4", "fp8"), f"expert_dtype {self.expert_dtype!r} (fp4 or fp8)")
        need(self.window_size > 0 and self.max_seq_len > 0, "window_size and max_seq_len must be positive")
        from .config_v41 import validate_v41
        validate_v41(self, need)


def _check_types(cfg: ModelConfig) -> None:
    """TypeError naming the field, the expected type and what came (``"256"``, null, true...)."""
    for f in dataclasses.fields(cfg):
        v, want = getattr(cfg, f.name), _TYPES.get(f.name)
        if f.name in _TUPLES:
            ok = isinstance(v, (tuple, list)) and all(isinstance(r, int) and not isinstance(r, bool) for r in v)
            want_s = "a list of integers"
        elif want is None:
            continue
        else:
            ok = isinstance(v, want) and not isinstance(v, bool)
            want_s = "an integer" if want is int else "a string" if want is str else "a number"
        if not ok:
            raise TypeError(f"ModelConfig({cfg.name}): {f.name} must be {want_s}, got {v!r} "
                            f"({type(v).__name__})")


def layer_kind(ratio: int) -> str:
    """SWA (ratio 0), CSA (ratio 4: overlapping compressor + indexer) or HCA (any other ratio)."""
    return SWA if ratio == 0 else CSA if ratio == 4 else HCA


_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
          "weight_block_size": [128, 128]}

# fields every released V4 config.json carries with these values (the architecture has no other setting for
# them); written so that peers (vLLM, llama.cpp's converter, transformers) load a preset's config unchanged
_HF_FIXED = {"attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
             "norm_topk_prob": True, "tie_word_embeddings": False, "topk_method": "noaux_tc",
             "transformers_version": "4.57.1", "use_cache": True}

# reference name -> HF name (fields with a different HF spelling, or the same, that HF configs carry)
_HF_NAMES = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
    "n_mtp_layers": "num_nextn_predict_layers", "n_heads": "num_attention_heads", "head_dim": "head_dim",
    "rope_head_dim": "qk_rope_head_dim", "q_lora_rank": "q_lora_rank", "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank", "window_size": "sliding_window", "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim", "index_topk": "index_topk", "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts", "n_activated_experts": "num_experts_per_tok",
    "n_hash_layers": "num_hash_layers", "moe_inter_dim": "moe_intermediate_size",
    "route_scale": "routed_scaling_factor", "swiglu_limit": "swiglu_limit", "score_func": "scoring_func",
    "hc_mult": "hc_mult", "hc_sinkhorn_iters": "hc_sinkhorn_iters", "hc_eps": "hc_eps",
    "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta", "compress_rope_theta": "compress_rope_theta",
    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
    "max_position_embeddings": "max_position_embeddings",
}
_ROPE_SCALING = {"factor": "rope_factor", "original_max_position_embeddings": "original_seq_len",
                 "beta_fast": "beta_fast", "beta_slow": "beta_slow"}
_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_TUPLES = {f.name for f in dataclasses.fields(ModelConfig) if str(f.type).startswith("tuple")}
_TYPES: dict[str, Any] = {f.name: {"int": int, "float": (int, float), "str": str}.get(str(f.type))
                          for f in dataclasses.fields(ModelConfig)}


def _check_quant(q: Mapping[str, Any] | None, where: str) -> None:
    if q is None:
        return
    bad = {k: q.get(k) for k, v in _QUANT.items() if k in q and q.get(k) != v and k != "activation_scheme"}
    if bad:
        raise ValueError(f"{where}: quantization_config {bad} is not the released format {_QUANT}")


def from_hf(d: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from a HF top-level ``config.json`` dict (missing ``expert_dtype`` means fp4, as vLLM)."""
    kw: dict[str, Any] = {ref: d[hf] for ref, hf in _HF_NAMES.items() if hf in d}
    rs = d.get("rope_scaling") or {}
    if rs and rs.get("type", rs.get("rope_type", "yarn")) != "yarn":
        raise ValueError(f"config.json: rope_scaling type {rs.get('type')!r} (V4 uses yarn)")
    kw.update({ref: rs[k] for k, ref in _ROPE_SCALING.items() if k in rs})
    if "compress_ratios" in d:
        kw["compress_ratios"] = tuple(d["compress_ratios"])
    if "expert_dtype" in d:
        kw["expert_dtype"] = d["expert_dtype"]
    _check_quant(d.get("quantization_config"), "config.json")
    if isinstance(d.get("dsv4rt"), Mapping):
        kw["extra"] = dict(d["dsv4rt"])
        if "preset" in kw["extra"]:
            kw["name"] = str(kw["extra"]["preset"])
    kw.setdefault("name", str(d.get("_name_or_path", "hf")))
    kw.update(overrides)
    try:
        return ModelConfig(**kw)
    except (TypeError, ValueError) as exc:  # name the field as the file spells it
        head, sep, msg = str(exc).partition("): ")
        field = msg.split(" ", 1)[0]
        hf = _HF_NAMES.get(field) or next((f"rope_scaling.{k}" for k, r in _ROPE_SCALING.items() if r == field), None)
        if sep and hf and hf != field and field not in overrides:
            raise type(exc)(f"{head}): {hf} ({field}){msg[len(field):]}") from None
        raise


def from_inference(d: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """ModelConfig from an ``inference/config.json`` dict (reference names; dtype/scale_fmt are checked)."""
    if d.get("dtype", "fp8") != "fp8" or d.get("scale_fmt", "ue8m0") not in ("ue8m0", None):
        raise ValueError(f"inference config: dtype={d.get('dtype')!r} scale_fmt={d.get('scale_fmt')!r}; "
                         f"only the released fp8 / ue8m0 format is supported")
    kw = {k: v for k, v in d.items() if k in _FIELDS}
    if "compress_ratios" in kw:
        kw["compress_ratios"] = tuple(kw["compress_ratios"])
    kw.setdefault("name", "inference")
    kw.update(overrides)
    return ModelConfig(**kw)


def from_dict(d: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Either spelling, detected by its keys (``hidden_size`` -> HF, ``dim`` -> inference); V4.1's nested
    ``text_config`` (or ``model_type: deepseek_v41``) -> :func:`dsv4rt.model.config_v41.from_hf_v41`."""
    from .config_v41 import ARCH_V41, from_hf_v41, is_v41_dict
    if is_v41_dict(d):
        if "dim" in d:   # the V4.1 inference/config.json: reference names, 32x32 FP8 blocks
            return from_inference(d, **{"arch": ARCH_V41, "fp8_block": 32, "n_hash_layers": 0, **overrides})
        return from_hf_v41(d, **overrides)
    if "hidden_size" in d:
        return from_hf(d, **overrides)
    if "dim" in d:
        return from_inference(d, **overrides)
    raise ValueError("config: neither a HF config.json (hidden_size) nor an inference/config.json (dim)")


def load_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
    """Read a config file, or a checkpoint directory's ``config.json`` (``inference/config.json`` fills
    ``expert_dtype`` when the top-level file lacks it). Malformed files raise CheckpointError."""
    path = os.fspath(path)
    files = [path] if os.path.isfile(path) else [os.path.join(path, "config.json"),
                                                 os.path.join(path, "inference", "config.json")]
    dicts = []
    for f in files:
        if os.path.isfile(f):
            try:
                with open(f, encoding="utf-8") as fh:
                    dicts.append(json.load(fh))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{f}: not a readable JSON config ({exc})") from None
    if not dicts:
        raise CheckpointError(f"{path}: no config.json (nor inference/config.json)")
    main = dicts[0]
    if len(dicts) > 1 and "hidden_size" in main and "expert_dtype" not in main and "expert_dtype" in dicts[1]:
        overrides.setdefault("expert_dtype", dicts[1]["expert_dtype"])
    try:
        return from_dict(main, **overrides)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{files[0]}: {exc}") from None


def _flash() -> ModelConfig:
    return ModelConfig(name="flash")


def _pro() -> ModelConfig:
    return ModelConfig(name="pro", dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16,
                       compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0), index_topk=1024,
                       n_routed_experts=384, moe_inter_dim=3072, route_scale=2.5)


def _tiny() -> ModelConfig:
    """Toy sizes, full structure: layers SWA, CSA, HCA, CSA (+ an SWA MTP block); layers 0-1 hash-routed,
    2-3 score-routed; FP4 experts and FP8 projections whose 128x128 / 1x32 blocks are all meaningful
    (dim 256 = two FP8 blocks). The 128-token window and the ratios 4 / 128 are the released ones, so a
    300-token sequence wraps the window and completes two HCA blocks. head_dim is 128 (64 nope + 64 rope),
    the byte-level vocabulary has 259 ids (bos 0, eos 1, pad 2, byte b -> b + 3)."""
    return ModelConfig(name="tiny", vocab_size=259, dim=256, n_layers=4, n_heads=8, head_dim=128,
                       q_lora_rank=128, o_groups=2, o_lora_rank=128, compress_ratios=(0, 4, 128, 4, 0),
                       index_n_heads=16, index_topk=16, n_routed_experts=8, n_activated_experts=2,
                       n_hash_layers=2, moe_inter_dim=128, route_scale=1.5,
                       extra={"tokenizer": "bytes", "preset": "tiny"})


def _flash_slice(n_layers: int = 4) -> ModelConfig:
    """V4-Flash widths (dim 4096, 64 heads, 256 experts, the real vocabulary) with Flash's first
    ``n_layers`` layers (SWA, SWA, CSA, HCA): for GPU throughput runs on synthetic weights."""
    ratios = _flash().compress_ratios[:n_layers] + (0,)
    return _flash().replace(name="flash-slice", n_layers=n_layers, compress_ratios=ratios,
                            extra={"tokenizer": "bytes", "preset": "flash-slice"})


def _v41(name: str) -> Any:
    def make() -> ModelConfig:
        from .config_v41 import V41_PRESETS
        return V41_PRESETS[name]()
    return make


PRESETS = {"flash": _flash, "pro": _pro, "tiny": _tiny, "flash-slice": _flash_slice,
           "flash41": _v41("flash41"), "tiny-v41": _v41("tiny-v41"), "flash41-slice": _v41("flash41-slice")}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset (``flash``, ``pro``, ``tiny``, ``flash-slice``) with optional field overrides."""
    try:
        cfg = PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    return cfg.replace(**overrides) if overrides else cfg
