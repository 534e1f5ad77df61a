"""Weight preparation for the ``ascend/fused`` GEMMs: the released MXFP4 / FP8 tensors, converted ONCE.

The op contracts (``fp4_grouped_gemm``, ``fp4_gemm``, ``fp8_gemm``) take the released format: MXFP4
``w [.., N, K/2]`` uint8/int8 E2M1 pairs with ``w_scale [.., N, K/32]`` E8M0, or FP8 E4M3 ``w [N, K]``
with ``[ceil(N/128), ceil(K/128)]`` scales. No Ascend chip multiplies that layout directly:

- A2 / A3 (910B / 910C) have no FP4 or FP8 matmul at all (docs/ascend.md section 2).
- 950 multiplies MXFP4 natively, but ``npu_grouped_matmul`` wants the weight cast to FRACTAL_NZ and the
  E8M0 scales interleaved as ``[E, K/64, N, 2]`` (the vllm-ascend recipe, docs/ascend.md section 2).

So :func:`prepare_weights` does the conversion once, at load time, and returns a :class:`PreparedWeight`.

**How a PreparedWeight reaches the op.** ``PreparedWeight`` is a ``torch.Tensor`` subclass that *is* the
released weight (it shares its storage, dtype and shape), with the converted copy attached. The caller
passes it in place of ``w`` (and the same ``w_scale`` as before)::

    w13 = prepare_weights(w13, s13)                       # once, after moving w13/s13 to the NPU
    y = dsv4rt.ops.fp4_grouped_gemm(x, w13, s13, offsets, "fp8")

The model does this through the backend-neutral load-time hook: its loader hands every GEMM weight on the
NPU to ``AscendBackend.prepare_weight`` (``dsv4rt.prepare``), which calls :func:`prepare_weights` with
the chip's default layout; conformance and bench go through ``prepare_inputs``, which does the same.

The contract check in ``runtime/ops`` passes unchanged (it sees the released tensor), the composite
``ascend/torch`` fallback computes from the released bytes exactly as before, and the fused variant uses
``w.prep``. Its ``supports()`` refuses, with a reason naming :func:`prepare_weights`, a raw weight on every
chip (each would need a per-call conversion), a layout prepared for another chip, and a ``w_scale`` other
than the one the weight was prepared with. Cost: the released bytes stay resident next to the converted
copy (they are what the fallback and the contract check read).

Layouts (``PreparedWeight.prep.layout``):

============== ========== ===== ===================================================================
tag            chips      exact converted tensor (``prep.tensor``) / scale (``prep.scale``)
============== ========== ===== ===================================================================
bf16-nd        A2 A3 950  yes   BF16 ``[E, K, N]`` (grouped) or ``[N, K]`` (dense), ND; no scale
bf16-nz        A2 A3 950  yes   the grouped BF16 ``[E, K, N]`` cast to FRACTAL_NZ (``npu_format_cast(t, 29)``)
950-mxfp4-nz   950        yes   ``npu_format_cast(u8 [E, N, K/2], 29, customize_dtype=float8_e4m3fn,
                                input_dtype=float4_e2m1fn_x2).transpose(1, 2)``; scale uint8 ``[E, K/64, N, 2]``
                                (a transposed view of ``[E, N, K/64, 2]`` memory, as the weight)
a2a3-w8a8-nz   A2 A3      NO    int8 ``[E, K, N]`` NZ, per-output-channel scale bf16 ``[E, N]`` (a lossy
                                requantisation; only with ``allow_lossy=True``)
============== ========== ===== ===================================================================

Exactness of ``bf16-*``: every E2M1 value times an E8M0 power of two has at most 3 significant bits and
the exponent range of fp32, so it is exact in BF16 wherever the fp32 composite decode is finite; an FP8
E4M3 value times an E8M0 scale likewise (4 significant bits). FP8 weights with *float32* scales (the -Base
checkpoints) are rounded by the BF16 conversion, so they need ``allow_lossy=True`` too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["PreparedWeight", "Prep", "prepare_weights", "LAYOUTS", "default_layout", "scale_key"]


@dataclass(frozen=True)
class LayoutInfo:
    chips: tuple[str, ...]
    exact: bool
    kinds: tuple[str, ...]  # "mxfp4-grouped", "mxfp4", "fp8"
    needs: tuple[str, ...] = ()  # torch_npu features the conversion needs


LAYOUTS: dict[str, LayoutInfo] = {
    "bf16-nd": LayoutInfo(("A2", "A3", "950"), True, ("mxfp4-grouped", "mxfp4", "fp8")),
    "bf16-nz": LayoutInfo(("A2", "A3", "950"), True, ("mxfp4-grouped",), ("npu_format_cast",)),
    "950-mxfp4-nz": LayoutInfo(("950",), True, ("mxfp4-grouped",),
                               ("npu_format_cast", "float4_e2m1fn_x2", "float8_e8m0fnu")),
    "a2a3-w8a8-nz": LayoutInfo(("A2", "A3"), False, ("mxfp4-grouped",), ("npu_format_cast",)),
}
"""Every layout tag: the chips whose fused op consumes it, whether it is exact, which weights it takes."""


def default_layout(kind: str, soc: str) -> str:
    """The layout :func:`prepare_weights` picks: native MXFP4 on 950 for the grouped experts, else BF16."""
    return "950-mxfp4-nz" if (kind == "mxfp4-grouped" and soc == "950") else "bf16-nd"


def bf16_experts_declined(op: str, w: Tensor, w_scale: Tensor, soc: str | None = None) -> str:
    """Why the model's load hook leaves an MXFP4 weight released (empty: prepare it). On a chip without FP4
    matmul (A2/A3) the default layout is a BF16 copy, 4x the packed bytes on top of them (V4-Flash: ~516 GiB
    of experts); that is opt-in (DSV4RT_ASCEND_BF16_EXPERTS=1), else the composite path dequantises per call."""
    from dsv4rt import env

    if op not in ("fp4_gemm", "fp4_grouped_gemm") or env.flag("DSV4RT_ASCEND_BF16_EXPERTS"):
        return ""
    kind = _kind(w, w_scale)
    if not default_layout(kind, soc or _detect_soc()).startswith("bf16"):
        return ""
    return ("its BF16 copy would take 4x the released bytes on this chip (no FP4 matmul); set "
            "DSV4RT_ASCEND_BF16_EXPERTS=1 to convert the experts at load, else they dequantise per call")


def scale_key(t: Tensor) -> tuple:
    """Identity of a scale tensor for the ``w_scale`` check (no data read, no sync)."""
    return (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


@dataclass(frozen=True)
class Prep:
    """What a fused GEMM consumes: the converted ``tensor`` (and ``scale``) in ``layout``."""

    layout: str
    kind: str
    tensor: Tensor
    scale: Tensor | None
    source_shape: tuple[int, ...]
    source_scale: tuple
    exact: bool
    block: int = 128  # fp8: the scale block size the weight was prepared with (128 V4, 32 V4.1)

    def refuse(self, chip: str, w_scale: Tensor) -> str | None:
        """Why this prepared weight cannot run on ``chip`` with ``w_scale`` (None when it can)."""
        info = LAYOUTS[self.layout]
        if chip not in info.chips:
            return (f"the weight was prepared as {self.layout!r}, which runs on {'/'.join(info.chips)}; this NPU "
                    f"is {chip} (call prepare_weights(..., layout={default_layout(self.kind, chip)!r}))")
        if scale_key(w_scale) != self.source_scale:
            return "w_scale is not the scale tensor this weight was prepared with (prepare_weights(w, w_scale))"
        return None


class PreparedWeight(Tensor):
    """The released weight tensor (same storage, dtype and shape, so the op contracts still pass) with
    the converted copy for a fused torch_npu op in ``.prep`` (a :class:`Prep`). Ops on it behave as on the
    released tensor and return plain tensors. Moving it (``.to``) returns a plain tensor: prepare after
    moving to the NPU."""

    prep: Prep
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def wrap(raw: Tensor, prep: Prep) -> "PreparedWeight":
        out = Tensor._make_subclass(PreparedWeight, raw, False)
        out.prep = prep
        return out

    def __repr__(self) -> str:  # the default repr would print the released bytes
        p = self.prep
        return (f"PreparedWeight(layout={p.layout!r}, source={tuple(self.shape)} {self.dtype}, "
                f"prepared={tuple(p.tensor.shape)} {p.tensor.dtype}, exact={p.exact}, device={self.device})")


def _kind(w: Tensor, w_scale: Tensor, block: int = 128) -> str:
    if w.dtype == torch.float8_e4m3fn:
        if block not in (32, 128):
            raise ValueError(f"prepare_weights: block_size must be 128 (V4) or 32 (V4.1), got {block!r}")
        if w.dim() != 2 or w_scale.dim() != 2 or \
                tuple(w_scale.shape) != (-(-w.shape[0] // block), -(-w.shape[1] // block)):
            raise ValueError(f"prepare_weights: FP8 weights are [N, K] with [ceil(N/{block}), ceil(K/{block})] "
                             f"scales (block_size={block}), got {tuple(w.shape)} and {tuple(w_scale.shape)}")
        return "fp8"
    if w.dtype not in (torch.uint8, torch.int8, torch.float4_e2m1fn_x2):
        raise ValueError(f"prepare_weights: w must be MXFP4 (uint8/int8/float4_e2m1fn_x2) or float8_e4m3fn, "
                         f"got {w.dtype}")
    if w.dim() not in (2, 3) or w_scale.dim() != w.dim() or w_scale.shape[-1] * 16 != w.shape[-1] \
            or w_scale.shape[:-1] != w.shape[:-1]:
        raise ValueError(f"prepare_weights: MXFP4 weights are [(E,) N, K/2] with [(E,) N, K/32] scales, got "
                         f"{tuple(w.shape)} and {tuple(w_scale.shape)}")
    return "mxfp4-grouped" if w.dim() == 3 else "mxfp4"


def _detect_soc() -> str:
    from ._npu import probe_features, module

    try:
        return probe_features(module()).soc
    except ImportError as exc:
        raise RuntimeError(f"prepare_weights: cannot read the SoC ({exc}); pass soc='A2'|'A3'|'950' or a layout") \
            from exc


def _dequant_rows(w: Tensor, w_scale: Tensor, kind: str, block: int = 128) -> Tensor:
    """float32 values [N, K] of one 2-D weight (one expert); ``block``: the FP8 scale block."""
    from dsv4rt.formats import dequant_fp8_block, dequant_mxfp4

    if kind == "fp8":
        return dequant_fp8_block(w, w_scale, block, torch.float32)
    return dequant_mxfp4(w, w_scale, torch.float32)


def _bf16(w: Tensor, w_scale: Tensor, kind: str, block: int = 128) -> Tensor:
    """BF16 [E, K, N] (grouped, one expert at a time: peak extra memory one fp32 expert) or [N, K]."""
    if kind != "mxfp4-grouped":
        return _dequant_rows(w, w_scale, kind, block).to(torch.bfloat16)
    e, n, half = w.shape
    out = torch.empty((e, 2 * half, n), dtype=torch.bfloat16, device=w.device)
    for i in range(e):
        out[i].copy_(_dequant_rows(w[i], w_scale[i], kind).t())
    return out


def _w8a8(w: Tensor, w_scale: Tensor) -> tuple[Tensor, Tensor]:
    """Lossy per-output-channel int8 requantisation: int8 [E, K, N] and bf16 scale [E, N]."""
    e, n, half = w.shape
    q = torch.empty((e, 2 * half, n), dtype=torch.int8, device=w.device)
    s = torch.empty((e, n), dtype=torch.float32, device=w.device)
    for i in range(e):
        v = _dequant_rows(w[i], w_scale[i], "mxfp4")
        amax = v.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        s[i] = amax / 127.0
        q[i].copy_(torch.round(v / s[i][:, None]).clamp(-127, 127).to(torch.int8).t())
    return q, s.to(torch.bfloat16)


def prepare_weights(w: Tensor, w_scale: Tensor, *, layout: str | None = None, soc: str | None = None,
                    allow_lossy: bool = False, block_size: int = 128) -> PreparedWeight:
    """Convert a released MXFP4 or FP8 weight, once, into the layout an ``ascend/fused`` GEMM consumes.

    ``w``/``w_scale``: the released tensors, already on the NPU (the conversion runs where they are; only
    the NZ layouts call torch_npu). ``layout``: a tag of :data:`LAYOUTS`; by default ``950-mxfp4-nz`` for
    grouped MXFP4 experts on a 950 and ``bf16-nd`` otherwise (``soc`` defaults to the chip torch_npu
    reports; pass it to prepare without one). ``allow_lossy``: required for the layouts that round
    (``a2a3-w8a8-nz``, and BF16 from FP8 with float32 scales); the fused GEMM then no longer computes the
    op contract exactly, so this is an explicit opt-in. ``block_size``: FP8 weights only, the scale block of
    the checkpoint (128 V4, 32 V4.1); the fused fp8_gemm then runs only calls with the same ``block_size``.
    Returns a :class:`PreparedWeight` to pass in place of ``w`` (see the module doc).
    """
    kind = _kind(w, w_scale, block_size)
    if layout is None:
        layout = default_layout(kind, soc or _detect_soc())
    if layout not in LAYOUTS:
        raise ValueError(f"prepare_weights: unknown layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    info = LAYOUTS[layout]
    if kind not in info.kinds:
        raise ValueError(f"prepare_weights: layout {layout!r} takes {', '.join(info.kinds)} weights, got {kind}")
    exact = info.exact and not (kind == "fp8" and w_scale.dtype == torch.float32)
    if not exact and not allow_lossy:
        raise ValueError(f"prepare_weights: layout {layout!r} for this {kind} weight rounds the released values "
                         f"(the fused GEMM would not compute the op contract exactly); pass allow_lossy=True to "
                         f"accept that")
    npu: Any = None
    if info.needs:
        from ._npu import module, probe_features

        npu = module()
        missing = probe_features(npu).missing(*info.needs)
        if missing:
            raise RuntimeError(f"prepare_weights: layout {layout!r} needs torch_npu.{', torch_npu.'.join(missing)}, "
                               f"which this torch_npu lacks")
    scale = None
    with torch.no_grad():
        if layout == "bf16-nd":
            tensor = _bf16(w, w_scale, kind, block_size)
        elif layout == "bf16-nz":
            tensor = npu.npu_format_cast(_bf16(w, w_scale, kind), 29)
        elif layout == "950-mxfp4-nz":
            from ._npu import npu_dtype

            e, n, half = w.shape
            if (2 * half) % 64:
                raise ValueError(f"prepare_weights: {layout!r} needs K % 64 == 0 (paired E8M0 scales), K = {2 * half}")
            nz = npu.npu_format_cast(w.view(torch.uint8), 29, customize_dtype=torch.float8_e4m3fn,
                                     input_dtype=npu_dtype(npu, "float4_e2m1fn_x2"))
            # vllm-ascend casts to NZ first and transposes the view afterwards: an NZ tensor made from an
            # already transposed weight lacks the transpose metadata that the FP8 x FP4 GMM expects.
            tensor = nz.transpose(1, 2)
            # The scale follows the same convention: a transposed [E, K/64, N, 2] *view* of [E, N, K/64, 2]
            # memory (vllm-ascend's working 950 MoE code for the released DeepSeek checkpoint, w4a8_mxfp4.py);
            # the op documentation gives the shape only, so the convention of the running code is followed.
            scale = w_scale.view(torch.uint8).reshape(e, n, (2 * half) // 64, 2).transpose(1, 2)
        else:  # a2a3-w8a8-nz
            q, scale = _w8a8(w, w_scale)
            tensor = npu.npu_format_cast(q, 29)
    prep = Prep(layout, kind, tensor, scale, tuple(w.shape), scale_key(w_scale), exact,
                block_size if kind == "fp8" else 128)
    return PreparedWeight.wrap(w.detach(), prep)
