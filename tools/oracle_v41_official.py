"""The official DeepSeek-V4.1 model on CPU, from a user's local copy of the release's ``inference/`` folder.

Nothing of the official code is part of this project: :func:`import_official` imports the user's folder as a
private package, with tools/oracle_v41_kernels.py standing in for the TileLang ``kernel`` module (registered
under ``kernel``, ``kernel_cpu`` and their package-relative names, so both the upstream ``from kernel import``
and a vendored ``from .kernel_cpu import`` resolve to it; ``engram`` / ``vision`` / ``image_processor`` resolve
both ways too). :func:`model_args` reads a released ``config.json`` (nested ``text_config``,
``quantization_config``) into the official ``ModelArgs``; :func:`load_weights` loads released safetensors.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib
import json
import os
import sys
import types
from typing import Any

import torch

import oracle_v41_kernels as shim

PKG = "_dsv4rt_v41_official"
ALIASES = ("kernel", "kernel_cpu", "engram", "vision", "image_processor")

# released text_config key -> official ModelArgs field (where they differ; equal names pass through)
HF_TO_ARGS = {
    "hidden_size": "dim", "moe_intermediate_size": "moe_inter_dim", "num_hidden_layers": "n_layers",
    "num_nextn_predict_layers": "n_mtp_layers", "num_attention_heads": "n_heads",
    "num_experts_per_tok": "n_activated_experts", "scoring_func": "score_func",
    "routed_scaling_factor": "route_scale", "qk_rope_head_dim": "rope_head_dim", "rms_norm_eps": "norm_eps",
    "sliding_window": "window_size", "kv_source_layer_ids": "kv_source_layers",
    "index_source_layer_ids": "index_source_layers", "candidate_source_layer_id": "candidate_source_layer",
    "engram_pad_token_id": "engram_pad_id", "dspark_num_experts_per_tok": "dspark_n_activated_experts",
}
ROPE_TO_ARGS = {"factor": "rope_factor", "beta_fast": "beta_fast", "beta_slow": "beta_slow",
                "original_max_position_embeddings": "original_seq_len"}
VISION_TO_ARGS = {"num_hidden_layers": "vision_n_layers", "hidden_size": "vision_dim",
                  "num_attention_heads": "vision_n_heads", "intermediate_size": "vision_inter_dim",
                  "patch_size": "vision_patch_size", "rope_theta": "vision_rope_theta",
                  "downsample_ratio": "vision_downsample_ratio", "max_image_tokens": "vision_max_n_token",
                  "min_pixels": "vision_min_pixels", "max_wh_ratio": "vision_max_wh_ratio"}
IGNORED = {"model_type", "num_key_value_heads", "hidden_act", "attention_bias", "attention_dropout", "topk_method",
           "tie_word_embeddings", "use_cache", "initializer_range", "max_position_embeddings", "rope_scaling",
           "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "architectures",
           "transformers_version", "quantization_config", "text_config", "vision_config", "dsv4rt",
           "_name_or_path", "expert_dtype"}


def _placeholder_pil() -> None:
    """image_processor imports PIL at module level for the vision path only; without Pillow installed, a
    placeholder whose every use raises stands in (the oracle compares text only)."""
    try:
        import PIL  # noqa: F401
        return
    except ImportError:
        pass

    class _Missing(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            raise ImportError(f"PIL.{name}: Pillow is not installed (the oracle does not run the vision path)")

    pil = types.ModuleType("PIL")
    pil.Image, pil.ImageOps = _Missing("PIL.Image"), _Missing("PIL.ImageOps")  # type: ignore[attr-defined]
    sys.modules.update({"PIL": pil, "PIL.Image": pil.Image, "PIL.ImageOps": pil.ImageOps})


def import_official(inference_dir: str) -> types.ModuleType:
    """The official ``model`` module from ``inference_dir`` (freshly imported: it holds module-level state)."""
    d = os.path.abspath(inference_dir)
    if not os.path.isfile(os.path.join(d, "model.py")) or not os.path.isfile(os.path.join(d, "engram.py")):
        raise FileNotFoundError(f"{inference_dir}: not the official inference/ folder (needs model.py and engram.py)")
    for k in [k for k in sys.modules if k == PKG or k.startswith(PKG + ".")]:
        del sys.modules[k]
    pkg = types.ModuleType(PKG)
    pkg.__path__ = [d]  # type: ignore[attr-defined]
    saved = {a: sys.modules.get(a) for a in ALIASES}
    sys.modules[PKG] = pkg
    _placeholder_pil()
    try:
        for a in ("kernel", "kernel_cpu"):
            sys.modules[a] = sys.modules[f"{PKG}.{a}"] = shim
        for a in ("engram", "image_processor", "vision"):
            if os.path.isfile(os.path.join(d, a + ".py")):
                sys.modules[a] = importlib.import_module(f"{PKG}.{a}")
        return importlib.import_module(f"{PKG}.model")
    finally:
        for a, m in saved.items():
            if m is None:
                sys.modules.pop(a, None)
            else:
                sys.modules[a] = m


def model_args(official: types.ModuleType, config: dict[str, Any], max_seq_len: int,
               precision: str = "release") -> tuple[Any, list[str]]:
    """(ModelArgs, notes) from a released config.json dict (or the inference/config.json form)."""
    fields = {f.name for f in dataclasses.fields(official.ModelArgs)}
    text = config.get("text_config", config)
    kw: dict[str, Any] = {}
    notes: list[str] = []
    for k, v in text.items():
        f = HF_TO_ARGS.get(k, k)
        if f in fields:
            kw[f] = tuple(v) if isinstance(v, list) else v
        elif k not in IGNORED:
            notes.append(f"config key {k!r} has no official ModelArgs field: ignored")
    kw.update({ROPE_TO_ARGS[k]: v for k, v in (text.get("rope_scaling") or {}).items() if k in ROPE_TO_ARGS})
    kw.update({VISION_TO_ARGS[k]: v for k, v in (config.get("vision_config") or {}).items() if k in VISION_TO_ARGS})
    if "image_token_id" in config:
        kw["image_token_id"] = config["image_token_id"]
    q = config.get("quantization_config") or text.get("quantization_config")
    if q is not None:
        if list(q.get("weight_block_size", [32, 32])) != [32, 32] or q.get("scale_fmt", "ue8m0") != "ue8m0":
            raise ValueError(f"quantization_config {q}: the official model.py is fixed to 32x32 blocks, ue8m0 scales")
        kw["expert_dtype"] = q.get("expert_dtype", "fp4")
        kw["dtype"] = "fp8"
    if precision == "fp32":
        kw.update(dtype="bf16", expert_dtype=None)  # no quantised Linear: weights are dequantised at load
    kw.update(max_batch_size=1, max_seq_len=max_seq_len, temperature=0.0)
    return official.ModelArgs(**kw), notes


class FastTokenizer:
    """What transformers' fast tokenizer offers the official Engram map: ``backend_tokenizer`` and ``len``."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        self.backend_tokenizer = Tokenizer.from_file(path)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)


def publish_index_keys(official: types.ModuleType, model: Any) -> int:
    """Work around a decode-time slip of the released model.py: an index-key owner (a kv source's indexer)
    publishes its key cache in ``shared_attn.index_k`` only on a step where its compressor emits a latent, so
    on the other decode steps (ratio 2: every even position) it reads the slot the LAST owner of the previous
    forward left there (the ratio-1 source's keys) instead of its own. Prefill is unaffected. This makes every
    owner publish its own cache before it reads, which is what prefill does. Returns how many indexers it wraps."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, official.Indexer) and mod.owns_k:
            def forward(*a, _mod=mod, _orig=mod.forward, **k):
                official.shared_attn.index_k = _mod.k_cache
                return _orig(*a, **k)
            mod.forward = forward
            n += 1
    return n


def build(official: types.ModuleType, args: Any, tokenizer_json: str | None, precision: str) -> Any:
    """The official Transformer on CPU: built under torch's default dtype bf16 (as generate.py) for "release";
    under fp32 for "fp32", where every bf16 parameter is then made fp32 (the code fixes some Linears to bf16)."""
    tok = FastTokenizer(tokenizer_json) if tokenizer_json else None
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    with official.set_dtype(dtype):
        model = official.Transformer(args, tok)
    if precision == "fp32":
        for blk in model.layers:   # the lookup is cast to bf16 before wkv: keep wkv FP8 (exact, see fp32_notes)
            if blk.engram is not None:
                w = blk.engram.wkv
                blk.engram.wkv = official.Linear(w.in_features, w.out_features, dtype=torch.float8_e4m3fn)
        for p in model.parameters():
            if p.dtype == torch.bfloat16:
                p.data = p.data.float()
    return model.eval()


FP32_NOTES = (
    "fp32 mode: no Linear is quantised (FP8/FP4 weights dequantised exactly to fp32) except Engram wkv: the "
    "official code casts the Engram row lookup to bf16 before wkv, so wkv stays FP8 there; its per-32 UE8M0 "
    "act_quant then re-quantises E4M3 table values losslessly (unless a 32-block's amax < 1e-4), so the product "
    "is an exact-input fp32 GEMM. KV / indexer quantise-dequantise calls are identity; sparse_attn is fp32.")


def read_safetensors(ckpt: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(ckpt, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no *.safetensors files")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(f).items():
            out[k[6:] if k.startswith("model.") else k] = v
    return out


def dequant_fp8(w: torch.Tensor, s: torch.Tensor, block: int = 32) -> torch.Tensor:
    """E4M3 [out, in] with E8M0 scales per block x block -> fp32 (exact)."""
    full = s.float().repeat_interleave(block, 0).repeat_interleave(block, 1)
    return w.float() * full[: w.size(0), : w.size(1)]


def dequant_fp4(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Packed E2M1 [out, in/2] (int8 bits or float4_e2m1fn_x2) with E8M0 per row per 32 -> fp32 (exact)."""
    vals = shim._unpack_fp4(w.contiguous().view(torch.uint8))
    return vals * s.float().repeat_interleave(32, 1)


def load_weights(model: Any, ckpt: str, vision: bool = False) -> list[str]:
    """Copy the checkpoint's tensors into the official model's parameters (strict both ways). Bit copies for
    FP8 / E8M0 / packed FP4; a quantised tensor feeding a dense parameter (``wo_a``, every Linear in fp32 mode)
    is dequantised exactly; float tensors are cast to the parameter's dtype. Returns notes."""
    src = read_safetensors(ckpt)
    params = dict(model.named_parameters())            # shared embed/head of the DSpark blocks appear once
    used: set[str] = set()
    notes: list[str] = []
    for name, p in params.items():
        if name not in src:
            raise KeyError(f"{ckpt}: no tensor {name!r} (the official model has it)")
        t = src[name]
        used.add(name)
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        scale = src.get(f"{base}.scale") if base is not None else None
        if p.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.float4_e2m1fn_x2):
            if t.element_size() != 1 or t.numel() != p.numel():
                raise ValueError(f"{name}: checkpoint {t.dtype} {tuple(t.shape)} for {p.dtype} {tuple(p.shape)}")
            p.data.copy_(t.contiguous().view(p.dtype).view(p.shape))
            continue
        if scale is not None and f"{base}.scale" not in params:
            t = dequant_fp4(t, scale) if t.dtype in (torch.int8, torch.uint8, torch.float4_e2m1fn_x2) \
                else dequant_fp8(t, scale)
            used.add(f"{base}.scale")
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)}, official {tuple(p.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: checkpoint {t.dtype} for a {p.dtype} parameter")
        v = t.to(p.dtype)
        if v.dtype.itemsize < t.dtype.itemsize and not torch.equal(v.to(t.dtype), t):
            notes.append(f"{name}: {t.dtype} -> {p.dtype} is not exact")
        p.data.copy_(v)
    extra = sorted(set(src) - used)
    skip = [n for n in extra if not vision and (n.endswith(".gate.bias_vl") or n.split(".")[0] in
                                                ("vision", "aligner", "image_start", "image_end", "image_newline"))]
    if skip:
        notes.append(f"{len(skip)} vision-only tensors not loaded (text model: gate.bias_vl, vision.*, ...)")
    rest = sorted(set(extra) - set(skip))
    if rest:
        raise KeyError(f"{ckpt}: tensors the official model does not have: {rest[:12]}"
                       f"{' ...' if len(rest) > 12 else ''}")
    return notes
