"""DeepSeek-V4.1 KV-cache formats (docs: spec deepseek-v41.md items b4, b5, d; section 2.2(d)).

Both formats store one row per token / compressed entry as plain uint8 bytes, **codes first, then the
scale bytes**, so a cache is one uint8 tensor ``[..., rows, width]`` and a row is one contiguous read.

* **Window (FP8, V4.1 ``_window_kv``: ``act_quant(kv, 32, "ue8m0", inplace=True)``).** Row of ``D`` values
  (``D % 32 == 0``, all 512 dims, the RoPE tail included) -> ``D + D/32`` bytes (528 at D = 512):
  bytes ``[0, D)`` are the E4M3 codes of ``x[i] / s[i // 32]``, bytes ``[D, D + D/32)`` the UE8M0 scales.
  Per 32-group ``g``: ``amax = max |x|`` (float32), ``s = 2^ceil(log2(max(amax, 1e-4) * float32(1/448)))``
  taken from the float32 bits as the kernel's ``fast_round_scale`` does; ``code = E4M3_rne(clamp(x / s,
  +-448))`` (satfinite; ``x / s`` is exact, s being a power of two). Scale byte = ``log2(s) + 127``.
  Decode: ``x = E4M3(code) * 2^(byte - 127)``.
* **Global compressed KV (FP4, V4.1 ``_compress_kv``: ``fp4_act_quant(latent, 16, inplace=True,
  scale_dtype=float8_e4m3fn)``).** Row of ``D`` values (``D % 16 == 0``) -> ``D/2 + D/16`` bytes (288 at
  D = 512): bytes ``[0, D/2)`` hold E2M1 codes two per byte (element ``2i`` in the low nibble, ``2i + 1`` in
  the high nibble, as the checkpoint's FP4), bytes ``[D/2, D/2 + D/16)`` the E4M3 scales. Per 16-group:
  ``s = E4M3_rne_satfinite(max(amax, 6 * 2^-9) / 6)`` (a float32 division; the floor keeps even an all-zero
  group's scale at 2^-9, the smallest E4M3 subnormal, so s > 0), ``code = E2M1_rne(clamp(x / s, +-6))``
  (``x / s`` a float32 division). Decode: ``x = E2M1(code) * E4M3(scale byte)``.

Both decodes are exact in float32 and exactly representable in bfloat16 (at most 4 + 2 significant bits).
Rounding is round-to-nearest-even throughout (the kernels' ``cvt.rn.satfinite``); these functions are
bit-exact with the official kernels' quantisers (tt-metal kernel_cpu.py ``act_quant`` / ``fp4_act_quant``,
K41:41-199) for every finite input. Inputs go through float32 first (exact for the model's bf16).

Non-finite inputs (defined here, never silently finite): FP8 - a NaN or +-inf anywhere in a 32-group makes
its scale byte 255 (the E8M0 NaN), so the whole group decodes to NaN. FP4 - a NaN makes the group's scale
the E4M3 NaN (0x7F), the whole group decodes to NaN; +-inf saturates like the kernel (the scale clamps to
448, the element to +-6, i.e. +-2688).

All functions take a torch tensor (any device, no host sync) or a NumPy array and return the same kind.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .formats import (_E4M3, _E8M0, _FP4_PAIRS, _INV448, Array, _as_f32, _bytes, _codes, _grid, _lut, _out_dtype,
                      _pow2_ceil, _xp)

__all__ = ["KV_FP8_BLOCK", "KV_FP4_BLOCK", "kv_fp8_row_bytes", "kv_fp4_row_bytes", "kv_fp8_dim", "kv_fp4_dim",
           "pack_kv_fp8", "unpack_kv_fp8", "pack_kv_fp4", "unpack_kv_fp4", "qdq_kv_fp8", "qdq_kv_fp4"]

KV_FP8_BLOCK = 32
"""Values per UE8M0 scale in the FP8 window rows."""
KV_FP4_BLOCK = 16
"""Values per E4M3 scale in the FP4 global rows."""
_FP4_FLOOR = 6 * 2.0 ** -9


def kv_fp8_row_bytes(d: int) -> int:
    """Bytes of one packed FP8 window row of ``d`` values: ``d + d/32`` (528 at d = 512)."""
    return d + d // KV_FP8_BLOCK


def kv_fp4_row_bytes(d: int) -> int:
    """Bytes of one packed FP4 global row of ``d`` values: ``d/2 + d/16`` (288 at d = 512)."""
    return d // 2 + d // KV_FP4_BLOCK


def kv_fp8_dim(width: int) -> int | None:
    """``d`` of a packed FP8 row of ``width`` bytes (width = 33 d / 32), or None if no d fits."""
    return width * 32 // 33 if width % 33 == 0 else None


def kv_fp4_dim(width: int) -> int | None:
    """``d`` of a packed FP4 row of ``width`` bytes (width = 9 d / 16), or None if no d fits."""
    return width * 16 // 9 if width % 9 == 0 else None


def _cat(xp: Any, parts: list) -> Array:
    return torch.cat(parts, -1) if xp.torch else np.concatenate(parts, -1)


def _groups(x32: Array, block: int) -> Array:
    return x32.reshape(tuple(x32.shape[:-1]) + (x32.shape[-1] // block, block))


def _rows(fn: str, x: Any, block: int) -> tuple:
    xp, x32 = _as_f32(x, fn, "x")
    if x32.ndim < 1 or x32.shape[-1] % block:
        raise ValueError(f"{fn}: x must be [..., D] with D % {block} == 0, got shape {tuple(x.shape)}")
    return xp, x32


def pack_kv_fp8(x: Array) -> Array:
    """Float x [..., D] (D % 32 == 0) -> uint8 [..., D + D/32]: E4M3 codes, then one UE8M0 byte per 32."""
    xp, x32 = _rows("pack_kv_fp8", x, KV_FP8_BLOCK)
    xb = _groups(x32, KV_FP8_BLOCK)
    s, sb = _pow2_ceil(xp, xp.amax(xp.abs(xb), -1), 1e-4, _INV448)   # NaN / inf amax -> byte 255
    q = xb / s[..., None]
    nan = xp.isnan(q)
    r, neg = _grid(xp, xp.where(nan, 0.0, q), 3, -6, 448.0)
    codes = xp.where(nan, 0x7F, _codes(xp, r, neg, 3, 7, 7))
    codes = xp.astype(codes, xp.uint8).reshape(tuple(x32.shape))
    return _cat(xp, [codes, xp.astype(sb, xp.uint8)])


def _split(fn: str, packed: Any, dim_of: Any, what: str) -> tuple:
    b = _bytes(packed, fn, "packed", ("uint8",))
    xp = _xp(b)
    d = dim_of(b.shape[-1]) if b.ndim >= 1 else None
    if d is None:
        raise ValueError(f"{fn}: packed must be uint8 [..., {what}], got shape {tuple(packed.shape)}")
    return xp, b, d


def unpack_kv_fp8(packed: Array, dtype: Any = "float32") -> Array:
    """uint8 [..., D + D/32] (pack_kv_fp8 rows) -> values [..., D]: ``E4M3(code) * 2^(scale - 127)``."""
    xp, b, d = _split("unpack_kv_fp8", packed, kv_fp8_dim, "D + D/32 with D % 32 == 0")
    v = _groups(_lut(xp, _E4M3, b[..., :d]), KV_FP8_BLOCK) * _lut(xp, _E8M0, b[..., d:])[..., None]
    return xp.astype(v.reshape(tuple(b.shape[:-1]) + (d,)), _out_dtype(xp, dtype, "unpack_kv_fp8"))


def pack_kv_fp4(x: Array) -> Array:
    """Float x [..., D] (D % 16 == 0) -> uint8 [..., D/2 + D/16]: E2M1 pairs (low nibble = even element),
    then one E4M3 scale byte per 16."""
    xp, x32 = _rows("pack_kv_fp4", x, KV_FP4_BLOCK)
    xb = _groups(x32, KV_FP4_BLOCK)
    amax = xp.clip(xp.amax(xp.abs(xb), -1), _FP4_FLOOR, None)
    s_raw = amax / np.float32(6.0) if not xp.torch else amax / 6.0    # float32 division, as the kernel
    nan = xp.isnan(s_raw)
    s_r, _ = _grid(xp, xp.where(nan, 1.0, s_raw), 3, -6, 448.0)       # E4M3 RNE, satfinite (s_raw > 0)
    s_code = xp.where(nan, 0x7F, _codes(xp, s_r, s_r < 0, 3, 7, 7))        # s_r > 0: no sign bit
    s = xp.where(nan, s_raw, s_r)
    v = xb / s[..., None]
    vnan = xp.isnan(v)
    r, neg = _grid(xp, xp.clip(xp.where(vnan, 0.0, v), -6.0, 6.0), 1, 0, 6.0)
    codes = xp.astype(_codes(xp, r, neg, 1, 1, 3), xp.uint8).reshape(tuple(x32.shape))
    c2 = codes.reshape(tuple(codes.shape[:-1]) + (codes.shape[-1] // 2, 2))
    return _cat(xp, [c2[..., 0] | (c2[..., 1] << 4), xp.astype(s_code, xp.uint8)])


def unpack_kv_fp4(packed: Array, dtype: Any = "float32") -> Array:
    """uint8 [..., D/2 + D/16] (pack_kv_fp4 rows) -> values [..., D]: ``E2M1(code) * E4M3(scale byte)``."""
    xp, b, d = _split("unpack_kv_fp4", packed, kv_fp4_dim, "D/2 + D/16 with D % 16 == 0")
    lead = tuple(b.shape[:-1])
    pairs = xp.take(xp.table(_FP4_PAIRS, b), b[..., :d // 2]).reshape(lead + (d,))
    v = _groups(pairs, KV_FP4_BLOCK) * _lut(xp, _E4M3, b[..., d // 2:])[..., None]
    return xp.astype(v.reshape(lead + (d,)), _out_dtype(xp, dtype, "unpack_kv_fp4"))


def qdq_kv_fp8(x: Array) -> Array:
    """x through the FP8 window format and back, in x's dtype (the release's ``act_quant(..., inplace=True)``)."""
    return unpack_kv_fp8(pack_kv_fp8(x), x.dtype)


def qdq_kv_fp4(x: Array) -> Array:
    """x through the FP4 global format and back, in x's dtype (the release's ``fp4_act_quant(..., inplace=True)``)."""
    return unpack_kv_fp4(pack_kv_fp4(x), x.dtype)
