"""Triton helpers of the precision points (sparse_attention ``p_dtype``, indexer_topk ``score_dtype``).

Only ``@triton.jit`` code. ``round_to(x, MODE)`` returns fp32 ``x`` rounded to nearest even at bf16
(MODE 1) or fp16 (MODE 2) precision, as fp32; MODE 0 returns ``x``. bf16 rounds on the bits, because the
Triton interpreter's fp32 -> bf16 cast does not round to nearest (seen with Triton 3.9); on a GPU the
same bit arithmetic is two integer ops.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, MODE: tl.constexpr):
    if MODE == 1:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    elif MODE == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x
