"""cuda/triton launchers of the GEMM family: fp4_gemm, fp4_grouped_gemm, fp8_gemm (spec sections 1.1-1.5).

Kernels are in ``kernels/gemm.py``; Triton is imported only by :func:`register` and the launchers.

Design (see :func:`plan`):

* MXFP4 (``fp4_gemm`` and ``fp4_grouped_gemm``, one kernel): the packed E2M1 bytes and E8M0 scales of a
  [BLOCK_N, BLOCK_K] weight tile are loaded as uint8, unpacked and scaled in registers (integer bit tricks, no
  table), and fed to ``tl.dot`` with a float32 accumulator; no dequantised weight ever reaches memory.
  - "small" path (rows per expert <= 16, i.e. decode): BLOCK_M = 16, wide weight tiles (BLOCK_N 64 x BLOCK_K 256
    on a GPU), even/odd-k products so the weight needs no interleave, and split-K (partials in float32, summed in
    a fixed order by a second tiny kernel) until the grid holds ~4 programs per SM: the weight streams at
    bandwidth.
  - "large" path (prefill): tensor-core tiles 64 x 128 x 64 over 8 warps, nibbles interleaved in registers.
  - Operands: bf16 x -> bf16 MMA with the E8M0 scale folded into the bf16 weight (E2M1 x 2^k is exact in bf16);
    fp16 / fp32 x -> TF32 MMA on float32 values (exact for fp16 x; fp32 x gets the TF32 rounding the contract's
    tolerance allows). ``act_quant="fp8"``: a small kernel rounds x per 1x128 block exactly like
    ``dsv4rt.formats.act_quant_fp8`` and writes q * s, which is exact in bf16, so the same bf16 MMA runs with
    exact products.
  - Grouped: ONE launch. Axis 0 of the grid enumerates (row tile, N block) pairs, N blocks fastest, over an
    upper bound of the (expert, row tile) schedule, min(R, cdiv(R, BLOCK_M) + E) tiles; each program finds its
    expert from ``offsets`` on the device (a prefix sum of per-expert tile counts, kernels._expert_tile) and
    exits when past the last tile. No host sync. Axis 1 is the K split.
* ``fp8_gemm``: E4M3 bytes decoded to float32 with integer bit operations (``kernels/decode.py``: no FP8 type,
  so sm_80 runs it) and converted to the MMA dtype (exact for bf16/fp16/fp32);
  block_size 128 (V4): BLOCK_N and BLOCK_K divide 128, so each K step's 128x128 scale (E8M0 or float32) is one
  scalar applied to the float32 partial product; block_size 32 (V4.1): BLOCK_K = 32 and each step's scales are
  a [BLOCK_N] vector (one per output column's 32-row block) applied to the partial product's columns. Edge
  blocks are masked. Same small (split-K) / large split by M. act_quant="fp8" quantises per 1 x block_size
  (fp4: per 1 x act_block_size).
* Non-contiguous inputs: weights and scales are always read through their strides (copying a weight would
  cost more than the op); x is read through its strides on the small path (x is tiny) and copied to contiguous
  rows on the large path when its last stride is not 1 (a copy of x is cheap next to the GEMM and enables
  vector loads). The fp8 quantiser reads x through its strides.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from dsv4rt.backend import new_output
from dsv4rt.backends.cuda import interpreter_requested
from ._launch import core_count, device_guard, dot_precision, kernels
from .capability import mma_refusal

__all__ = ["Plan", "plan", "fp4_gemm", "fp4_grouped_gemm", "fp8_gemm", "act_quant_fp8", "register",
           "supports_fp4", "supports_fp8"]

SMALL_ROWS = 16
"""Rows per expert (M for a dense GEMM) up to which the small (weight-streaming, split-K) path runs."""
_DOT = {torch.bfloat16: "bf16", torch.float16: "tf32", torch.float32: "tf32"}  # fp4: operand dtype per x dtype
_DOT8 = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "tf32"}  # fp8: E4M3 is exact in fp16


@dataclass(frozen=True)
class Plan:
    """How one call is launched: path, tile shape, split-K and MMA operand dtype ("bf16", "fp16", "tf32")."""

    path: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_steps: int
    num_warps: int
    num_stages: int
    dot: str


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return core_count(device)


def _split(k: int, bk: int, ctas: int, interp: bool, device: torch.device) -> tuple[int, int]:
    """(splits, K steps per split): split K (powers of two) until ~4 programs per SM (2 K steps per split at
    least); under the interpreter until 8 programs, so CI exercises the split-K reduction."""
    steps = max(1, _cdiv(k, bk))
    target, min_steps = (8, 1) if interp else (4 * _sm_count(device), 2)
    split = 1
    while ctas * split * 2 <= target and _cdiv(steps, split * 2) >= min_steps and split < 64:
        split *= 2
    per = _cdiv(steps, split)
    return _cdiv(steps, per), per


def _tiles(op: str, args: Mapping[str, Any], bm: int) -> int:
    rows = args["x"].shape[0]
    if op == "fp4_grouped_gemm":
        return min(rows, _cdiv(rows, bm) + args["w"].shape[0])
    return _cdiv(rows, bm)


def plan(op: str, args: Mapping[str, Any], path: str | None = None) -> Plan:
    """Launch plan of ``op`` for ``args`` (the op's arguments by name); ``path`` forces "small" or "large"."""
    x = args["x"]
    rows, k = x.shape
    n = args["w"].shape[-2]
    interp = interpreter_requested()
    per_group = rows / max(1, args["w"].shape[0]) if op == "fp4_grouped_gemm" else rows
    path = path or ("small" if per_group <= SMALL_ROWS else "large")
    fp8 = op == "fp8_gemm"
    scale_block = args.get("block_size", 128) if fp8 else 128
    dot = "bf16" if args["act_quant"] == "fp8" else (_DOT8 if fp8 else _DOT)[x.dtype]
    # GPU tiles: 8 warps, and K steps of 64 on the large path, keep the decoded weight tile, the partial
    # product and the accumulator in registers. tools/compile_check.py (sm_80 / sm_90a): the 16x64 small
    # tiles spilled 230-380 B per thread over 4 warps and none over 8; 64x128x128 over 4 warps spilled
    # 2.7-4.5 KB and 128x128x128 over 8 warps 1-2 KB, 64x128x64 over 8 warps spills none (fp4) / 88 B (fp8,
    # sm_90a). Speed on a GPU is not measured yet (docs/gpu-support.md).
    if path == "small":
        bm, bn, bk, warps, stages = (16, 64, 128, 4, 1) if interp else (16, 64, 256 if dot == "bf16" else 128, 8, 3)
    elif interp:
        bm, bn, bk, warps, stages = 32, 64, 64, 4, 1
    else:
        bm, bn, bk, warps, stages = 64, 128, 64, 8, 4
    bk = min(bk, scale_block) if fp8 else min(bk, max(32, _pow2(k)))  # fp8: BLOCK_K divides the scale block
    split, per = 1, _cdiv(k, bk)
    if path == "small":
        split, per = _split(k, bk, _tiles(op, args, bm) * _cdiv(n, bn), interp, x.device)
    return Plan(path, bm, bn, bk, split, per, warps, stages, dot)


def _meta(k: int, p: Plan, x: Tensor) -> dict[str, Any]:
    """Launch meta-parameters shared by the GEMM kernels. EVEN_K: the splits tile K exactly, so the K masks
    (which would break full-width vector loads) are compiled out. DOT_PREC: the float32 product's precision
    on x's device (TF32 on NVIDIA, HF32 on Ascend)."""
    return {"BLOCK_M": p.block_m, "BLOCK_N": p.block_n, "BLOCK_K": p.block_k, "K_STEPS": p.k_steps,
            "EVEN_K": k == p.split_k * p.k_steps * p.block_k, "DOT": _tl_dtype(p.dot),
            "DOT_PREC": dot_precision(x), "INTERP": interpreter_requested(), "num_warps": p.num_warps,
            "num_stages": p.num_stages}


def _tl_dtype(name: str) -> Any:
    import triton.language as tl
    return {"bf16": tl.bfloat16, "fp16": tl.float16, "tf32": tl.float32}[name]


def _quantize(x: Tensor, fold: bool, block: int = 128) -> tuple[Tensor, Tensor]:
    """Launch the per-1 x block E4M3 quantiser on x [M, K] (any strides). fold: (q*s bf16 [M, K], same); else
    (q float32 [M, K], s float32 [M, ceil(K/block)])."""
    m, k = x.shape
    nb = _cdiv(k, block)
    q = torch.empty((m, k), dtype=torch.bfloat16 if fold else torch.float32, device=x.device)
    s = q if fold else torch.empty((m, nb), dtype=torch.float32, device=x.device)
    if m and k:
        rows = 16 if interpreter_requested() or block == 32 else 4   # ~512+ elements per program
        with device_guard(x):
            kernels("gemm").act_quant_kernel[(_cdiv(m, rows), nb)](
                x, q, s, m, k, x.stride(0), x.stride(1), q.stride(0), s.stride(0), FOLD=fold, BLOCK_R=rows,
                BLOCK=block, num_warps=4)
    return q, s


def act_quant_fp8(x: Tensor, block: int = 128) -> tuple[Tensor, Tensor]:
    """The Triton quantiser as ``dsv4rt.formats.act_quant_fp8(x, block)`` for a 2-D x: (q float32 [M, K]
    holding E4M3 values, s float32 [M, ceil(K/block)] powers of two); bit-identical to it. Used by the tests."""
    return _quantize(x, fold=False, block=block)


def _prepare_x(x: Tensor, act_quant: str | None, p: Plan, block: int = 128) -> Tensor:
    if act_quant == "fp8":
        return _quantize(x, fold=True, block=block)[0]
    if p.path == "large" and x.stride(1) != 1:
        return x.contiguous()  # cheap next to the GEMM; enables vector loads of x rows
    return x


def _finish(out: Tensor, y: Tensor, p: Plan) -> Tensor:
    """Sum split-K partials y [split, rows, n] into out (no-op without split)."""
    if p.split_k > 1:
        total = out.numel()
        kernels("gemm").split_sum_kernel[(_cdiv(total, 1024),)](
            y, out, total, SPLIT=p.split_k, BLOCK=1024, INTERP=interpreter_requested(), num_warps=4)
    return out


def _fp4(x: Tensor, w: Tensor, w_scale: Tensor, offsets: Tensor | None, act_quant: str | None,
         path: str | None, act_block: int = 128) -> Tensor:
    grouped = offsets is not None
    args = {"x": x, "w": w if grouped else w.unsqueeze(0), "act_quant": act_quant}
    rows, k = x.shape
    n = w.shape[-2]
    out = new_output((rows, n), x.dtype, x.device)
    if rows == 0 or n == 0:
        return out
    p = plan("fp4_grouped_gemm" if grouped else "fp4_gemm", args, path)
    wb, sb = w.view(torch.uint8), w_scale.view(torch.uint8)  # int8 / float4_e2m1fn_x2 / float8_e8m0fnu bytes
    if not grouped:
        wb, sb = wb.unsqueeze(0), sb.unsqueeze(0)
    e = wb.shape[0]
    with device_guard(x):
        xk = _prepare_x(x, act_quant, p, act_block)
        y = out if p.split_k == 1 else torch.empty((p.split_k, rows, n), dtype=torch.float32, device=x.device)
        grid = (_tiles("fp4_grouped_gemm" if grouped else "fp4_gemm", args, p.block_m) * _cdiv(n, p.block_n),
                p.split_k)
        kernels("gemm").fp4_gemm_kernel[grid](
            xk, wb, sb, y, offsets.contiguous() if grouped else wb, rows, n, k, e,   # the kernel reads offsets densely
            xk.stride(0), xk.stride(1), *wb.stride(), *sb.stride(), 0 if p.split_k == 1 else rows * n, n,
            GROUPED=grouped, BLOCK_E=max(16, _pow2(e)), EVEN_ODD=p.path == "small", **_meta(k, p, x))
        return _finish(out, y, p)


def fp4_gemm(x: Tensor, w: Tensor, w_scale: Tensor, act_quant: str | None = None, act_block_size: int = 128, *,
             path: str | None = None) -> Tensor:
    """cuda/triton ``fp4_gemm``: y[M, N] = q(x) @ dequant(w).T, fp32 accumulation, y in x's dtype.

    w [N, K/2] uint8 / int8 / float4_e2m1fn_x2 (low nibble = even k), w_scale [N, K/32] E8M0 bytes or
    float8_e8m0fnu; any strides. M <= 16: weight-streaming split-K path (two launches when split); else
    tensor-core tiles. act_quant="fp8" adds one quantiser launch (bit-identical to formats.act_quant_fp8,
    1 x act_block_size blocks: 128 V4, 32 V4.1). No host synchronisation. ``path`` ("small" / "large")
    overrides the choice (tests).
    """
    return _fp4(x, w, w_scale, None, act_quant, path, act_block_size)


def fp4_grouped_gemm(x: Tensor, w: Tensor, w_scale: Tensor, offsets: Tensor, act_quant: str | None = None,
                     act_block_size: int = 128, *, path: str | None = None) -> Tensor:
    """cuda/triton ``fp4_grouped_gemm``: rows offsets[e]:offsets[e+1] of x times expert e's MXFP4 weight.

    x [R, K], w [E, N, K/2], w_scale [E, N, K/32], offsets [E+1] int32 (read on the device only: no host
    sync). One GEMM launch for all experts (see the module docstring); empty experts cost one early-exiting
    program at most. The path is chosen from the mean rows per expert R / E (<= 16: small).
    """
    return _fp4(x, w, w_scale, offsets, act_quant, path, act_block_size)


def fp8_gemm(x: Tensor, w: Tensor, w_scale: Tensor, act_quant: str | None = None, block_size: int = 128, *,
             path: str | None = None) -> Tensor:
    """cuda/triton ``fp8_gemm``: y[M, N] = q(x) @ (w * scale).T with bs x bs block scales (bs = block_size,
    128 V4 / 32 V4.1), fp32 accumulation.

    w [N, K] float8_e4m3fn (any strides), w_scale [ceil(N/bs), ceil(K/bs)] E8M0 (bytes or float8_e8m0fnu)
    or float32; partial edge blocks are masked. MMA operands: bf16 (bf16 x or act_quant="fp8"), fp16 (fp16 x),
    TF32 (fp32 x). E4M3 decoded from the bits: any sm_80+ GPU. No host synchronisation.
    """
    m, k = x.shape
    n = w.shape[0]
    out = new_output((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:   # an empty sum; the kernel's K loop and scale tiles assume K >= 1
        return out.zero_()
    p = plan("fp8_gemm", {"x": x, "w": w, "act_quant": act_quant, "block_size": block_size}, path)
    e8m0 = w_scale.dtype != torch.float32
    sb = w_scale.view(torch.uint8) if e8m0 else w_scale
    wb = w.view(torch.uint8)
    with device_guard(x):
        xk = _prepare_x(x, act_quant, p, block_size)
        y = out if p.split_k == 1 else torch.empty((p.split_k, m, n), dtype=torch.float32, device=x.device)
        grid = (_cdiv(m, p.block_m) * _cdiv(n, p.block_n), p.split_k)
        kernels("gemm").fp8_gemm_kernel[grid](
            xk, wb, sb, y, m, n, k, xk.stride(0), xk.stride(1), *wb.stride(), *sb.stride(),
            0 if p.split_k == 1 else m * n, n, SCALE_E8M0=e8m0, SCALE_BLOCK=block_size, **_meta(k, p, x))
        return _finish(out, y, p)


@functools.lru_cache(maxsize=None)
def _old_triton() -> str | None:
    import triton
    old = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 0)
    return f"Triton {triton.__version__} is too old (3.0+: tl.join, input_precision)" if old else None


def supports_fp4(args: Mapping[str, Any]) -> str | None:
    """None, or why cuda/triton cannot run this fp4_gemm / fp4_grouped_gemm call (checks common to all three)."""
    x = args["x"]
    if _old_triton():
        return _old_triton()
    if interpreter_requested():
        return None if x.device.type == "cpu" else f"Triton interpreter mode runs on CPU tensors, x is on {x.device}"
    if x.device.type == "npu":
        return None   # ascend/triton (triton-ascend): backends/ascend/triton_npu.py checked that it can run
    if not x.is_cuda:
        return f"cuda/triton needs CUDA tensors, x is on {x.device}"
    return mma_refusal(x)


def supports_fp8(args: Mapping[str, Any]) -> str | None:
    """None, or why cuda/triton cannot run this fp8_gemm call. The E4M3 weights are decoded from their bits
    (no FP8 type), so fp8_gemm runs wherever fp4_gemm does: sm_80+ (A100 / A800 included)."""
    return supports_fp4(args)


def register(registrar: Any, device_type: str, priority: int) -> None:
    """Register variant "triton" of fp4_gemm, fp4_grouped_gemm and fp8_gemm (imports Triton and the kernels)."""
    kernels("gemm")
    for op, fn, sup in (("fp4_gemm", fp4_gemm, supports_fp4), ("fp4_grouped_gemm", fp4_grouped_gemm, supports_fp4),
                        ("fp8_gemm", fp8_gemm, supports_fp8)):
        registrar.implement(op, "triton", fn, priority=priority, supports=sup, device_type=device_type)
