"""Decoding E4M3 (OCP float8_e4m3fn) bytes in Triton kernels, with the NaN codes intact under the interpreter.

Only ``@triton.jit`` code. On a GPU the hardware conversion decodes every code; the Triton interpreter decodes
the two NaN codes 0x7F / 0xFF as +-480 (as if E4M3 had a top binade of numbers), so a weight or key holding
NaN gave a finite product there while every other variant gives NaN. ``INTERP`` (constexpr) puts NaN back
from the bits; the GPU path compiles without it.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def e4m3_to_f32(bits, INTERP: tl.constexpr):
    """E4M3 bytes (uint8) -> float32 values; codes 0x7F / 0xFF are NaN on the GPU and under the interpreter."""
    v = bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    if INTERP:
        v = tl.where((bits & 0x7F) == 0x7F, float("nan"), v)
    return v
