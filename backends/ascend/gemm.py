"""``ascend/fused`` GEMMs on prepared weights: fp4_grouped_gemm via ``npu_grouped_matmul``, and the dense
fp4_gemm / fp8_gemm as one BF16 matmul on a ``bf16-nd`` prepared weight.

Weights must come through :func:`dsv4rt.backends.ascend.prepare_weights` (see ``weights.py`` for why and
how a :class:`PreparedWeight` passes the op contract). A raw released weight is refused by ``supports()``
on every chip, with a reason naming ``prepare_weights``, and the composite ``ascend/torch`` variant runs.

The activation side is exact w.r.t. the contract's ``q(x)``:

- ``act_quant=None``: x is used as is (BF16 layouts need bf16 x; fp16 / fp32 x are refused: converting
  them to bf16 would round).
- ``act_quant="fp8"``: ``q(x)`` is computed by the composite code (per 1x128 block, or 1x32 for V4.1's
  ``act_block_size`` / ``block_size`` 32; power-of-two scale, E4M3 values); its values are E4M3 codes times
  powers of two, exact in BF16. On the 950 MXFP4 path they are then re-expressed as MXFP8 (1x32 blocks) by
  ``npu_dynamic_mx_quant(..., scale_alg=1)``, whose block scale is ``2^ceil(log2(amax / 448))``: for a block
  of values ``m * s`` (``|m| <= 448`` E4M3, ``s`` one power of two over the 32-block, which holds for both
  activation block sizes since both are multiples of 32 aligned at 0) that scale is ``s * 2^-t`` with
  ``t >= 0`` and ``|m| * 2^t <= 448``, so every element is again an exact E4M3 value: the MXFP8 tensor
  represents ``q(x)`` exactly (aclnnDynamicMxQuant, scaleAlg 1).
- ``fp8_gemm(block_size=32)`` (V4.1's 32x32 weight blocks) runs on a ``bf16-nd`` weight prepared with
  ``prepare_weights(w, w_scale, block_size=32)`` (exact: E4M3 x 2^k is a bf16 value). No quantised torch_npu
  matmul takes it: ``npu_quant_matmul`` (A2/A3) multiplies int8/int4 with one scale per output channel (``[N]``)
  and per token (``[M]``), and ``npu_weight_quant_batchmatmul`` dequantises int8/int4 weights; neither
  represents a scale that changes every 32 k within a row, so those ops are not used.

The 950 call passes no ``x_dtype``: the activations are a native ``torch.float8_e4m3fn`` tensor, and the
graph-mode (meta) registration of ``npu_grouped_matmul`` in torch_npu 2.13 / 2.14 accepts ``x_dtype`` only
for dtypes torch lacks (hifloat8, FP4: :data:`GMM_DTYPE_ARGS`), so passing it would make graph capture /
``torch.compile`` raise although eager mode takes it. ``supports()`` checks every ``*_dtype`` value the
call passes against that table (``tests/data/ascend`` holds the wheel's, and a test compares them).

All functions are device-agnostic (the wiring tests call them on CPU tensors with a stand-in torch_npu).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ._npu import Features, module as _module, npu_dtype
from .weights import PreparedWeight, scale_key

__all__ = ["register", "make_fp4_grouped_gemm", "supports_fp4_grouped", "make_dense", "supports_dense",
           "MAX_GROUPS", "INNER_LIMIT"]

log = logging.getLogger("dsv4rt")
MAX_GROUPS = 1024
"""npu_grouped_matmul: at most 1024 groups in the single-x / single-weight / single-y mode."""
INNER_LIMIT = 65536
"""npu_grouped_matmul on A2/A3: the last dimension of x and of the weight must be below 65536."""
DYNAMIC_QUANT_K_A2 = 11264
"""npu_dynamic_quant on A2: the last dimension of x at most 11264."""
_CHIPS = ("A2", "A3", "950")
GMM_DTYPE_ARGS = {"x_dtype": ("float4_e1m2fn_x2", "float4_e2m1fn_x2", "hifloat8"),
                  "weight_dtype": ("float4_e1m2fn_x2", "float4_e2m1fn_x2", "hifloat8"),
                  "scale_dtype": ("float8_e8m0fnu",), "per_token_scale_dtype": ("float8_e8m0fnu",)}
"""The torch_npu dtype constants the meta registration of npu_grouped_matmul accepts per argument."""
_MX_DTYPE_ARGS = {"weight_dtype": "float4_e2m1fn_x2", "per_token_scale_dtype": "float8_e8m0fnu"}
"""What the 950 MxA8W4 call passes (x is a native float8_e4m3fn tensor: no x_dtype)."""


def gmm_dtype_reason(npu: Any, passed: Mapping[str, str]) -> str | None:
    """Why a ``npu_grouped_matmul`` call with these ``*_dtype`` constants would fail in graph mode."""
    for arg, name in passed.items():
        if name not in GMM_DTYPE_ARGS.get(arg, ()):
            return (f"{arg}={name}: npu_grouped_matmul's graph-mode registration accepts {arg} only for "
                    f"{', '.join(GMM_DTYPE_ARGS.get(arg, ()))}")
        try:
            npu_dtype(npu, name)
        except KeyError:
            return f"torch_npu lacks the dtype constant {name} for {arg}"
    return None


def _raw_reason(feat: Features, kind: str) -> str:
    why = {"A2": "A2 has no FP4/FP8 matmul", "A3": "A3 has no FP4/FP8 matmul",
           "950": "the 950 GMM wants the weight in FRACTAL_NZ and the E8M0 scales as [E, K/64, N, 2]"}
    from .weights import default_layout

    return (f"raw released {kind} weight: {why.get(feat.soc, f'SoC {feat.soc} has no fused path')}, which "
            f"would need a conversion on every call; call dsv4rt.backends.ascend.prepare_weights(w, w_scale"
            f"{'' if feat.soc in _CHIPS else ', soc=...'}) once at load (layout "
            f"{default_layout(kind, feat.soc)!r}) and pass the result as w")


def _quantized_bf16(x: Tensor, act_quant: str | None, block: int = 128) -> Tensor:
    """q(x) as bf16 (1 x block activation scales), exact (see the module doc)."""
    if act_quant is None:
        return x
    from dsv4rt.backends.composite.gemm import quantize_activation

    return quantize_activation(x, act_quant, block).to(torch.bfloat16)


def supports_fp4_grouped(feat: Features) -> Callable[[Mapping[str, Any]], str | None]:
    """Documented limits of npu_grouped_matmul (docs/ascend.md section 2; op-plugin GMM doc)."""
    def supports(a: Mapping[str, Any]) -> str | None:
        w, x = a["w"], a["x"]
        if feat.soc not in _CHIPS:
            return f"SoC {feat.soc}: the fused GEMMs target A2, A3 and 950"
        if not isinstance(w, PreparedWeight):
            return _raw_reason(feat, "mxfp4-grouped")
        p = w.prep
        if p.kind != "mxfp4-grouped":
            return f"the weight was prepared as a {p.kind} weight, not grouped MXFP4 experts"
        reason = p.refuse(feat.soc, a["w_scale"])
        if reason:
            return reason
        e, n = w.shape[0], w.shape[1]
        k = x.shape[1]
        if e > MAX_GROUPS:
            return f"E = {e} experts > {MAX_GROUPS} (npu_grouped_matmul group_list limit)"
        if feat.soc in ("A2", "A3") and max(k, n) >= INNER_LIMIT:
            return f"K = {k} / N = {n}: npu_grouped_matmul's last dimensions must be < {INNER_LIMIT} on A2/A3"
        if p.layout.startswith("bf16"):
            if x.dtype != torch.bfloat16:
                return f"x is {x.dtype}; the BF16 grouped GEMM needs bfloat16 x (converting would round)"
            return None
        if p.layout == "950-mxfp4-nz":
            if a["act_quant"] != "fp8":
                return ("act_quant=None: the 950 MxA8W4 GEMM quantizes activations to MXFP8, which the contract "
                        "allows only for act_quant='fp8'; prepare layout 'bf16-nd' for unquantized activations")
            if x.dtype not in (torch.bfloat16, torch.float16):
                return f"x is {x.dtype}; the MxA8W4 GEMM outputs bfloat16 or float16 only"
            if k == 64 or e == 1:
                return f"E = {e}, K = {k}: the MxA8W4 GMM does not support E = 1 or K = 64"
            missing = feat.missing("npu_dynamic_mx_quant", "float4_e2m1fn_x2", "float8_e8m0fnu")
            if missing:
                return f"torch_npu lacks {', '.join(missing)}"
            return gmm_dtype_reason(_module(), _MX_DTYPE_ARGS)
        if p.layout == "a2a3-w8a8-nz":
            if x.dtype != torch.bfloat16:
                return f"x is {x.dtype}; the W8A8 GEMM with bf16 scales outputs bfloat16 only"
            if feat.soc == "A2" and k > DYNAMIC_QUANT_K_A2:
                return f"K = {k} > {DYNAMIC_QUANT_K_A2}: npu_dynamic_quant's limit on A2"
            return None if feat.has("npu_dynamic_quant") else "torch_npu lacks npu_dynamic_quant"
        return f"layout {p.layout!r} has no grouped fused path"
    return supports


def make_fp4_grouped_gemm(npu: Any, feat: Features, fallback: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """fp4_grouped_gemm through ``torch_npu.npu_grouped_matmul`` on a prepared weight."""
    supports = supports_fp4_grouped(feat)

    def fp4_grouped_gemm(x: Tensor, w: Tensor, w_scale: Tensor, offsets: Tensor,
                         act_quant: str | None = None, act_block_size: int = 128) -> Tensor:
        # The dispatcher's selection cache keys on shape/dtype/device only, so a raw weight of the same
        # shape can arrive here after a prepared one was selected: re-check (no sync) and fall back.
        reason = supports({"x": x, "w": w, "w_scale": w_scale, "offsets": offsets, "act_quant": act_quant,
                           "act_block_size": act_block_size})
        if reason or x.shape[0] == 0:
            if reason:
                log.info("dsv4rt: ascend/fused fp4_grouped_gemm -> composite: %s", reason)
            return fallback(x, w, w_scale, offsets, act_quant, act_block_size)
        p = w.prep
        # offsets[E+1] (offsets[0] = 0) -> cumulative ends [E], group_list_type 0: group e = rows
        # group_list[e-1]:group_list[e], exactly the contract's offsets[e]:offsets[e+1].
        group_list = offsets[1:].to(torch.int64)
        common = dict(group_list=group_list, group_type=0, group_list_type=0, split_item=3)
        if p.layout.startswith("bf16"):
            xb = _quantized_bf16(x, act_quant, act_block_size).contiguous()
            return npu.npu_grouped_matmul([xb], [p.tensor], output_dtype=torch.bfloat16, **common)[0]
        if p.layout == "950-mxfp4-nz":
            xq = _quantized_bf16(x, act_quant, act_block_size).contiguous()
            x8, x_scale = npu.npu_dynamic_mx_quant(xq, axis=-1, round_mode="rint",
                                                   dst_type=npu_dtype(npu, "float8_e4m3fn"), block_size=32,
                                                   scale_alg=1)
            return npu.npu_grouped_matmul(
                [x8], [p.tensor], antiquant_scale=[p.scale], per_token_scale=[x_scale],
                output_dtype=x.dtype, **{a: npu_dtype(npu, n) for a, n in _MX_DTYPE_ARGS.items()}, **common)[0]
        # a2a3-w8a8-nz (lossy, opted into at prepare time)
        xq, x_scale = npu.npu_dynamic_quant(_quantized_bf16(x, act_quant, act_block_size).contiguous())
        return npu.npu_grouped_matmul([xq], [p.tensor], scale=[p.scale], per_token_scale=[x_scale],
                                      output_dtype=torch.bfloat16, **common)[0]

    return fp4_grouped_gemm


def supports_dense(feat: Features, op: str) -> Callable[[Mapping[str, Any]], str | None]:
    kind = "fp8" if op == "fp8_gemm" else "mxfp4"

    def supports(a: Mapping[str, Any]) -> str | None:
        w, x = a["w"], a["x"]
        if not isinstance(w, PreparedWeight):
            return (f"raw released {kind} weight: the dense BF16 path needs it converted once; call "
                    f"dsv4rt.backends.ascend.prepare_weights(w, w_scale) at load and pass the result as w")
        p = w.prep
        if p.kind != kind or p.layout != "bf16-nd":
            return f"the weight was prepared as {p.layout!r} ({p.kind}); {op} runs a 'bf16-nd' {kind} weight"
        if kind == "fp8" and a.get("block_size", 128) != p.block:
            return (f"block_size={a.get('block_size', 128)}, but the weight was prepared with block_size={p.block} "
                    f"(prepare_weights(w, w_scale, block_size=...))")
        if scale_key(a["w_scale"]) != p.source_scale:
            return "w_scale is not the scale tensor this weight was prepared with (prepare_weights(w, w_scale))"
        if x.dtype != torch.bfloat16:
            return f"x is {x.dtype}; the BF16 matmul needs bfloat16 x (converting would round)"
        return None
    return supports


def make_dense(op: str, feat: Features, fallback: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """fp4_gemm / fp8_gemm: ``q(x) @ W^T`` with W the prepared BF16 weight; torch.matmul runs it on the NPU
    cube (aclnnMatmul, fp32 accumulation), no per-call decode."""
    supports = supports_dense(feat, op)

    block_arg = "block_size" if op == "fp8_gemm" else "act_block_size"

    def dense(x: Tensor, w: Tensor, w_scale: Tensor, act_quant: str | None = None, block: int = 128) -> Tensor:
        # block: fp8_gemm's block_size (weight tiles and activation blocks) or fp4_gemm's act_block_size
        reason = supports({"x": x, "w": w, "w_scale": w_scale, "act_quant": act_quant, block_arg: block})
        if reason:
            log.info("dsv4rt: ascend/fused %s -> composite: %s", op, reason)
            return fallback(x, w, w_scale, act_quant, block)
        return torch.matmul(_quantized_bf16(x, act_quant, block), w.prep.tensor.t())

    dense.__name__ = dense.__qualname__ = op
    return dense


def register(registrar: Any, npu: Any, feat: Features, priority: int, device_type: str) -> None:
    from dsv4rt.backends.composite import gemm as composite

    if feat.has("npu_grouped_matmul"):
        registrar.implement("fp4_grouped_gemm", "fused", make_fp4_grouped_gemm(npu, feat, composite.fp4_grouped_gemm),
                            priority=priority, requires=("npu_grouped_matmul",), device_type=device_type,
                            supports=supports_fp4_grouped(feat))
    for op in ("fp4_gemm", "fp8_gemm"):
        registrar.implement(op, "fused", make_dense(op, feat, getattr(composite, op)), priority=priority,
                            device_type=device_type, supports=supports_dense(feat, op))
