"""Bit-level decoders of the narrow formats, shared by every Triton kernel: E4M3, E8M0 and E2M1 bytes -> float32.

Only ``@triton.jit`` code. Each decoder builds the float32 bit pattern with integer operations (and, shift, add,
select) and reinterprets it, so no kernel needs a native FP8 type:

* the same code compiles for every NVIDIA target, sm_80 included (Triton's ``float8e4nv`` exists only on
  sm_89+), and passes front ends without FP8 types (triton-ascend 3.2 rejects ``tl.float8e4nv``);
* it is exact and identical on the GPU and under the Triton interpreter (whose own E4M3 conversion turns the
  NaN codes 0x7F / 0xFF into +-480), so CI checks the GPU arithmetic itself.

No native-FP8 fast path is kept for sm_89+: a hardware conversion would save a few integer operations per
weight byte, which only matters if the decode (not memory) bounds a kernel, and that has not been measured on
a GPU. A capability-selected variant would have to be shown faster there first (docs/gpu-support.md).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def e4m3_to_f32(c):
    """E4M3 (OCP float8_e4m3fn) bytes (any integer dtype) -> float32: bias 7, subnormals m * 2^-9, 0x7F / 0xFF
    NaN, no infinities. A normal code's magnitude bits ``eeee mmm`` shifted by 20 are the float32 exponent and
    mantissa once the exponent is rebiased by +120."""
    c = c.to(tl.int32)   # int8 bytes sign-extend: bit 7 still holds the sign, m7 masks the rest
    m7 = c & 0x7F
    sub = (m7.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)   # e = 0: m * 2^-9 (exact)
    bits = tl.where(m7 < 8, sub, (m7 << 20) + 0x3C000000)
    bits = tl.where(m7 == 0x7F, 0x7FC00000, bits) | ((c & 0x80) << 24)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e8m0_to_f32(b):
    """E8M0 (UE8M0) bytes (any integer dtype) -> float32 2^(b - 127); byte 0 is the subnormal 2^-127, 255 NaN."""
    b = b.to(tl.int32) & 0xFF
    bits = tl.where(b == 0, 0x00400000, b << 23)
    return tl.where(b == 255, 0x7FC00000, bits).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_to_f32(c):
    """E2M1 codes (int32 in 0..15, bit 3 = sign) -> float32 0, 0.5, 1, 1.5, 2, 3, 4, 6 (signed)."""
    e = (c >> 1) & 3
    m = c & 1
    bits = tl.where(e == 0, m * 0x3F000000, ((e + 126) << 23) | (m << 22))
    return (bits | ((c & 8) << 28)).to(tl.float32, bitcast=True)
