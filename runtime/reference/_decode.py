"""Plain decoders for the weight / scale formats of docs/deepseek-v4.md section 1.

Written out by hand on purpose (the reference must not depend on dsv4rt.formats): every function
returns exact float64 values, so the golden ops never round anything they did not mean to.
"""

import torch

F64 = torch.float64

# Spec 1.1 (S1 convert.py FP4_TABLE): E2M1 code -> value; bit 3 is the sign.
E2M1_TABLE = (
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
)

_BYTE_VIEW_DTYPES = tuple(
    getattr(torch, name)
    for name in ("int8", "float4_e2m1fn_x2", "float8_e8m0fnu", "float8_e4m3fn")
    if hasattr(torch, name)
)


def as_bytes(t):
    """Reinterpret a 1-byte tensor (uint8, int8, float4_e2m1fn_x2, float8_*) as uint8, no copy of bits."""
    if t.dtype == torch.uint8:
        return t
    if t.dtype in _BYTE_VIEW_DTYPES:
        return t.view(torch.uint8)
    return t.to(torch.uint8)


def decode_e2m1(packed):
    """Unpack E2M1 pairs ``[..., K/2]`` (uint8 / int8 / float4_e2m1fn_x2) into float64 ``[..., K]``.

    Spec 1.2: byte j holds element k = 2j in the low nibble (bits 0-3) and k = 2j+1 in the high
    nibble (bits 4-7); spec 1.1 gives the value of each 4-bit code.
    """
    b = as_bytes(packed).to(torch.int64)
    low = b & 0xF   # element 2j
    high = b >> 4   # element 2j+1
    codes = torch.stack([low, high], dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)
    table = torch.tensor(E2M1_TABLE, dtype=F64)
    return table[codes]


def decode_e8m0(scale):
    """E8M0 bytes (uint8 or float8_e8m0fnu) -> float64 ``2^(byte - 127)``; byte 255 is NaN (spec 1.3)."""
    b = as_bytes(scale).to(F64)
    v = torch.exp2(b - 127.0)
    return torch.where(b == 255.0, torch.full_like(v, float("nan")), v)


def decode_e4m3(t):
    """float8_e4m3fn values (or their uint8 bytes) -> float64, exactly."""
    if t.dtype == torch.uint8:
        t = t.view(torch.float8_e4m3fn)
    return t.to(F64)


def decode_block_scale(scale):
    """A block-scale tensor as float64: E8M0 bytes (uint8 / float8_e8m0fnu) are decoded, float
    scales (float32 / bfloat16 / float16 / float64) are taken as they are."""
    if scale.is_floating_point() and scale.element_size() > 1:
        return scale.to(F64)
    return decode_e8m0(scale)


def to_f64(t):
    """Any tensor (bf16, fp32, fp8, ...) as exact float64."""
    return t.to(F64)


def dequant_fp4(w, w_scale):
    """Spec 1.3: ``W[..., n, k] = E2M1(code[..., n, k]) * 2^(w_scale[..., n, k // 32] - 127)``.

    ``w [..., N, K/2]`` packed E2M1, ``w_scale [..., N, K/32]`` E8M0 -> float64 ``[..., N, K]``.
    """
    values = decode_e2m1(w)
    scales = decode_e8m0(w_scale).repeat_interleave(32, dim=-1)
    return values * scales


def dequant_fp8(w, w_scale, block=128):
    """Spec 1.4/1.5 dense FP8: ``W[n, k] = e4m3(w[n, k]) * scale[n // block, k // block]``.

    ``w [N, K]`` float8_e4m3fn (or its bytes), ``w_scale [ceil(N/block), ceil(K/block)]`` E8M0 or float
    -> float64 ``[N, K]``. ``block`` is 128 for V4 and 32 for V4.1 (its ``fp8_block_size``).
    """
    values = decode_e4m3(w)
    n, k = values.shape
    s = decode_block_scale(w_scale)
    rows = torch.arange(n) // block
    cols = torch.arange(k) // block
    return values * s[rows][:, cols]
