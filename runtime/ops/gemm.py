"""FP4 / FP8 dequant GEMM family: fp4_gemm, fp4_grouped_gemm, fp8_gemm (docs/deepseek-v4.md sections 1.1-1.5)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from . import _check as c
from ..spec import OutputSpec, declare_spec

FAMILY = "gemm"
_REF = "dsv4rt.reference:"
_CASES = "dsv4rt.conformance.cases.gemm:"
_TOL = "dsv4rt.conformance.tolerance:"
ACT_QUANT = (None, "fp8")
BLOCK_SIZES = (32, 128)
"""Block sizes of fp8_gemm's weight tiles and of act_quant="fp8": 128 for V4, 32 for V4.1 (the official
kernel asserts the same two)."""


def fp4_gemm(x: Tensor, w: Tensor, w_scale: Tensor, act_quant: str | None = None,
             act_block_size: int = 128) -> Tensor:
    """y[M, N] = q(x)[M, K] @ dequant(w)[N, K]^T, accumulated in fp32, returned in x's dtype.

    - ``x``: [M, K] float32 / bfloat16 / float16, K % 32 == 0.
    - ``w``: [N, K/2] MXFP4 weights: E2M1 codes, two per byte, the low nibble is the even k
      (uint8, int8 or torch.float4_e2m1fn_x2).
    - ``w_scale``: [N, K/32] E8M0 scales, one per 32 consecutive k of a row
      (torch.float8_e8m0fnu or its uint8 bytes); ``dequant(w)[n, k] = E2M1[code] * 2^(byte - 127)``.
    - ``act_quant``: None (x used as is) or "fp8": x is first rounded to E4M3 per 1 x ``act_block_size``
      block of K (the last block may be partial) with the power-of-two (UE8M0) scale
      ``2^ceil(log2(max(amax, 1e-4) / 448))`` computed in fp32 (the reference's ``act_quant``), values
      ``e4m3_rne(clamp(x / s, -448, 448)) * s``; a backend may then use FP8 MMA, since FP4 -> FP8 is exact.
      A block of x holding Inf or NaN has a non-finite scale (the kernel's exponent bits are 255) and
      quantises to NaN, so the rows it feeds are NaN. Without act_quant, NaN / Inf in x follow IEEE
      arithmetic.
    - ``act_block_size``: 128 (V4) or 32 (V4.1, ``linear(..., act_block_size=32)``): the K width of one
      activation scale. The weight format does not depend on it; without act_quant it changes nothing.
    Never materialises the whole dequantised weight (implementations work one block at a time).
    """


def fp4_grouped_gemm(x: Tensor, w: Tensor, w_scale: Tensor, offsets: Tensor,
                     act_quant: str | None = None, act_block_size: int = 128) -> Tensor:
    """y[R, N]: rows ``offsets[e]:offsets[e+1]`` of x multiply expert e's MXFP4 weight (as fp4_gemm).

    - ``x``: [R, K] rows grouped by expert (the output of moe_dispatch); float32 / bfloat16 / float16.
    - ``w``: [E, N, K/2] MXFP4, ``w_scale``: [E, N, K/32] E8M0, same encoding as fp4_gemm.
    - ``offsets``: [E+1] int32, offsets[0] = 0, non-decreasing, offsets[E] = R. Empty experts allowed.
    - ``act_quant``, ``act_block_size``: as fp4_gemm (the quantisation is per row, independent of the
      grouping). Output dtype = x dtype, fp32 accumulation.
    """


def fp8_gemm(x: Tensor, w: Tensor, w_scale: Tensor, act_quant: str | None = None,
             block_size: int = 128) -> Tensor:
    """y[M, N] = q(x) @ dequant(w)^T for FP8 E4M3 weights with bs x bs block scales (the dense projections).

    - ``block_size`` (bs): 128 (V4, the default) or 32 (V4.1: ``fp8_block_size = 32``, one scale per 32x32
      weight block and per 32 activations).
    - ``x``: [M, K] float32 / bfloat16 / float16.
    - ``w``: [N, K] torch.float8_e4m3fn; its NaN codes (0x7F / 0xFF) are NaN, so they make output column n
      NaN in every row.
    - ``w_scale``: [ceil(N/bs), ceil(K/bs)], E8M0 (float8_e8m0fnu or uint8 bytes) or float32 (the
      -Base checkpoints); ``dequant(w)[n, k] = w[n, k] * scale[n // bs, k // bs]``. Edge blocks may be
      partial (N, K need not be multiples of bs).
    - ``act_quant``: None or "fp8": per 1 x bs block of K, as fp4_gemm (Inf / NaN blocks included).
      Then ``y[m, n] = sum_kb (A_kb . W_kb^T) * sa[m, kb] * sw[n // bs, kb]`` (A the E4M3 codes, sa the
      activation scales), which is ``q(x) @ dequant(w)^T``.
    Output dtype = x dtype, fp32 accumulation. Without act_quant, NaN / Inf in x follow IEEE arithmetic
    (order-independent: a NaN or an Inf times a zero weight gives NaN, Infs of both signs give NaN).
    """


def _block(op: str, name: str, v: Any) -> int:
    c.integer(op, name, v)
    c.choice(op, name, v, BLOCK_SIZES)
    return v


def _act(op: str, a: Mapping[str, Any], block: str = "act_block_size") -> tuple[int, int]:
    c.tensor(op, "x", a["x"], 2, c.FLOAT_ACT)
    c.choice(op, "act_quant", a["act_quant"], ACT_QUANT)
    _block(op, block, a.get(block, 128))   # absent: the default (callers of check() that predate V4.1)
    return a["x"].shape


def _fp4_weight(op: str, a: Mapping[str, Any], lead: tuple[int, ...], k: int) -> int:
    nd = len(lead) + 2
    c.tensor(op, "w", a["w"], nd, c.FP4_PACKED)
    c.tensor(op, "w_scale", a["w_scale"], nd, c.E8M0)
    if k % 32:
        raise c.ContractError(op, "x", "K (x.shape[1]) divisible by 32 (the MXFP4 block)", f"K = {k}")
    n = a["w"].shape[-2]
    sym = "[E, N, " if lead else "["
    c.shape(op, "w", a["w"], (*lead, n, k // 2), f"{sym}N, K/2]")
    c.shape(op, "w_scale", a["w_scale"], (*lead, n, k // 32), f"{sym}N, K/32]")
    return n


def _check_fp4_gemm(a: Mapping[str, Any]) -> None:
    _, k = _act("fp4_gemm", a)
    _fp4_weight("fp4_gemm", a, (), k)


def _check_fp4_grouped(a: Mapping[str, Any]) -> None:
    op = "fp4_grouped_gemm"
    _, k = _act(op, a)
    c.tensor(op, "w", a["w"], 3, c.FP4_PACKED)
    e = a["w"].shape[0]
    _fp4_weight(op, a, (e,), k)
    c.tensor(op, "offsets", a["offsets"], 1, c.INDEX)
    c.shape(op, "offsets", a["offsets"], (e + 1,), "[E+1]")


def _check_fp8_gemm(a: Mapping[str, Any]) -> None:
    op = "fp8_gemm"
    m, k = _act(op, a, "block_size")
    bs = a.get("block_size", 128)
    c.tensor(op, "w", a["w"], 2, (torch.float8_e4m3fn,))
    n = a["w"].shape[0]
    c.shape(op, "w", a["w"], (n, k), "[N, K]")
    c.tensor(op, "w_scale", a["w_scale"], 2, c.E8M0_OR_F32)
    c.shape(op, "w_scale", a["w_scale"], (-(-n // bs), -(-k // bs)),
            f"[ceil(N/{bs}), ceil(K/{bs})] (block_size={bs})")


def _values_scale(op: str):
    def check(a: Mapping[str, Any]) -> None:
        c.e8m0_finite(op, "w_scale", a["w_scale"])
    return check


def _values_grouped(a: Mapping[str, Any]) -> None:
    op = "fp4_grouped_gemm"
    c.e8m0_finite(op, "w_scale", a["w_scale"])
    off = a["offsets"]
    rows = a["x"].shape[0]
    if int(off[0]) != 0:
        raise c.ContractError(op, "offsets", "offsets[0] == 0", f"offsets[0] = {int(off[0])}")
    if int(off[-1]) != rows:
        raise c.ContractError(op, "offsets", f"offsets[E] == R (x.shape[0] = {rows})", f"offsets[E] = {int(off[-1])}")
    steps = off[1:] - off[:-1]
    if bool((steps < 0).any()):
        e = int((steps < 0).nonzero()[0, 0])
        raise c.ContractError(op, "offsets", "non-decreasing offsets",
                              f"offsets[{e}] = {int(off[e])} > offsets[{e + 1}] = {int(off[e + 1])}")


def _out_gemm(a: Mapping[str, Any]) -> tuple[OutputSpec, ...]:
    return (OutputSpec("y", (a["x"].shape[0], a["w"].shape[-2]), a["x"].dtype),)


FP4_GEMM = declare_spec(fp4_gemm, family=FAMILY, check=_check_fp4_gemm, outputs=_out_gemm,
                        check_values=_values_scale("fp4_gemm"), reference=_REF + "fp4_gemm",
                        cases=_CASES + "fp4_gemm", tolerance=_TOL + "gemm")
FP4_GROUPED_GEMM = declare_spec(fp4_grouped_gemm, family=FAMILY, check=_check_fp4_grouped, outputs=_out_gemm,
                                check_values=_values_grouped, reference=_REF + "fp4_grouped_gemm",
                                cases=_CASES + "fp4_grouped_gemm", tolerance=_TOL + "gemm")
FP8_GEMM = declare_spec(fp8_gemm, family=FAMILY, check=_check_fp8_gemm, outputs=_out_gemm,
                        check_values=_values_scale("fp8_gemm"), reference=_REF + "fp8_gemm",
                        cases=_CASES + "fp8_gemm", tolerance=_TOL + "gemm")
SPECS = (FP4_GEMM, FP4_GROUPED_GEMM, FP8_GEMM)
