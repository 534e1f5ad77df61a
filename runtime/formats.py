"""Weight and activation formats of DeepSeek-V4 (docs/deepseek-v4.md sections 1, 2.2 and 3.1).

* E2M1 (FP4): 16 codes, bit 3 = sign; two codes per byte along K, low nibble = even k, high = odd k.
* E8M0 (UE8M0 scales): byte b means 2^(b-127); 255 is NaN; no sign, no zero.
* E4M3 (float8_e4m3fn): bias 7, max 448, 0x7F / 0xFF are NaN, no infinities.

Every function takes torch tensors or NumPy arrays and returns the same kind, with one implementation
written against ``_xp(x)`` (the few calls whose spelling differs). Power-of-two scales and RNE rounding onto
the E2M1 / E4M3 grids use integer views of float32, as the official kernels' ``fast_round_scale`` does
(``amax * float32(1/max)``, ceil-log2 from the bits), so every backend gets bit-identical results. Float
inputs go through float32 first (exact for bf16/fp16; float64 is rounded twice, as torch's float8 casts do).
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch

Array = Union[torch.Tensor, np.ndarray]

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

_B = np.arange(256)
_FP4_PAIRS = np.array(FP4_VALUES, np.float32)[np.stack([_B & 15, _B >> 4], -1)]  # byte -> (even, odd)
_E8M0 = np.where(_B < 255, np.exp2(_B - 127.0), np.nan).astype(np.float32)
_E, _M = (_B >> 3) & 15, _B & 7
_E4M3 = (np.where(_E == 0, _M * 2.0 ** -9, (1 + _M / 8) * np.exp2(_E - 7.0)) * np.where(_B & 0x80, -1.0, 1.0))
_E4M3 = np.where((_B & 0x7F) == 0x7F, np.nan, _E4M3).astype(np.float32)
_INV6 = float(np.float32(1 / 6))      # the kernels' fp4_max_inv / fp8_max_inv, as float32 constants
_INV448 = float(np.float32(1 / 448))
_FP4_DT = ("uint8", "int8", "float4_e2m1fn_x2")
_E8M0_DT = ("uint8", "float8_e8m0fnu")
_E4M3_DT = ("uint8", "float8_e4m3fn")
_BYTE_DT = ("uint8", "int8", "float4_e2m1fn_x2", "float8_e8m0fnu", "float8_e4m3fn")
_TABLES: dict = {}


def _torch_table(arr: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    key = (id(arr), like.device)
    if key not in _TABLES:
        _TABLES[key] = torch.tensor(arr, device=like.device)
    return _TABLES[key]


def _np_astype(x: np.ndarray, dt: Any) -> np.ndarray:
    with np.errstate(over="ignore"):  # float64 -> float32 overflow: callers check the result
        return x.astype(dt, copy=False)


_SAME = ("where", "abs", "round", "isnan", "isfinite", "clip", "stack", "amax", "amin")
_NP = SimpleNamespace(
    **{n: getattr(np, n) for n in _SAME}, torch=False, repeat=np.repeat,
    astype=_np_astype, zeros=lambda shape, dt, like: np.zeros(shape, dt), contig=np.ascontiguousarray,
    table=lambda arr, like: arr, take=lambda table, idx: table.take(idx, axis=0), int32=np.int32, int64=np.int64, uint8=np.uint8, float32=np.float32)
_TORCH = SimpleNamespace(
    **{n: getattr(torch, n) for n in _SAME}, torch=True, repeat=torch.repeat_interleave,
    astype=lambda x, dt: x.to(dt), zeros=lambda shape, dt, like: torch.zeros(shape, dtype=dt, device=like.device),
    contig=lambda x: x.contiguous(), table=_torch_table, take=lambda table, idx: table[idx.long()],
    int32=torch.int32, int64=torch.int64, uint8=torch.uint8, float32=torch.float32)


def _xp(x: Any, fn: str = "formats", arg: str = "x", like: Optional[SimpleNamespace] = None) -> SimpleNamespace:
    xp = _TORCH if isinstance(x, torch.Tensor) else _NP if isinstance(x, np.ndarray) else None
    if xp is None or (like is not None and xp is not like):
        want = "a torch.Tensor or numpy.ndarray" if like is None else "the same kind (torch/NumPy) as argument 1"
        raise TypeError(f"{fn}: {arg} must be {want}, got {type(x).__name__}")
    return xp


def _dname(x: Array) -> str:
    return str(x.dtype).replace("torch.", "") if isinstance(x, torch.Tensor) else x.dtype.name


def _bytes(x: Any, fn: str, arg: str, allowed: Tuple[str, ...] = _BYTE_DT) -> Array:
    xp = _xp(x, fn, arg)
    name = _dname(x)
    if name not in allowed:
        raise TypeError(f"{fn}: {arg} must have dtype {' / '.join(allowed)}, got {name}")
    return x if name == "uint8" else x.view(xp.uint8)


def _as_f32(x: Any, fn: str, arg: str) -> Tuple[SimpleNamespace, Array]:
    xp = _xp(x, fn, arg)
    name = _dname(x)
    floating = x.is_floating_point() if xp.torch else (x.dtype.kind == "f" or name == "bfloat16")
    if not floating or name in _BYTE_DT:
        raise TypeError(f"{fn}: {arg} must be a floating-point array (float32/bf16/fp16/fp64), got {name}")
    return xp, xp.astype(x, xp.float32)


def _out_dtype(xp: SimpleNamespace, dtype: Any, fn: str) -> Any:
    """dtype as the input's library spells it (accepts torch dtypes, NumPy dtypes and names)."""
    try:
        if isinstance(dtype, torch.dtype):
            return dtype if xp.torch else np.dtype(str(dtype).replace("torch.", ""))
        if not xp.torch:
            return np.dtype(dtype)
        dt = getattr(torch, dtype if isinstance(dtype, str) else np.dtype(dtype).name, None)
        if isinstance(dt, torch.dtype):
            return dt
    except TypeError:
        pass
    raise TypeError(f"{fn}: dtype must be a {'torch' if xp.torch else 'NumPy'} float dtype, got {dtype!r}")


def _positive(block: Any, fn: str, arg: str = "block") -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"{fn}: {arg} must be a positive int, got {block!r}")
    return block


def _lut(xp: SimpleNamespace, table: np.ndarray, b: Array) -> Array:
    return xp.take(xp.table(table, b), b)  # numpy: take() on uint8 indices, no int64 copy


def _pow2_ceil(xp: SimpleNamespace, amax: Array, floor: float, inv: float) -> Tuple[Array, Array]:
    """2^ceil(log2(max(amax, floor) * inv)) as float32 (NaN stays NaN) and its E8M0 byte as int32."""
    y = xp.clip(amax, floor, None) * inv
    bits = y.view(xp.int32)
    b = xp.clip(((bits >> 23) & 0xFF) + xp.astype((bits & 0x7FFFFF) != 0, xp.int32), 0, 255)
    return xp.where(xp.isnan(y), y, (b << 23).view(xp.float32)), b


def _grid(xp: SimpleNamespace, q: Array, mbits: int, emin: int, vmax: float) -> Tuple[Array, Array]:
    """Round float32 q to nearest-even on a minifloat grid (mbits mantissa bits, min normal exponent emin,
    saturating at vmax). Returns (|value|, sign mask)."""
    neg = q.view(xp.int32) < 0
    a = xp.clip(xp.abs(q), None, vmax)
    e = xp.clip(((a.view(xp.int32) >> 23) & 0xFF) - 127, emin, None)
    step = ((e - mbits + 127) << 23).view(xp.float32)
    return xp.round(a / step) * step, neg


def _codes(xp: SimpleNamespace, r: Array, neg: Array, mbits: int, bias: int, sign: int) -> Array:
    """Minifloat codes (int32) of finite grid values r >= 0 (bias = exponent bias, sign = sign bit index)."""
    sub = xp.astype(r * float(2 ** (mbits - 1 + bias)), xp.int32)
    nrm = (r.view(xp.int32) >> (23 - mbits)) - ((127 - bias) << mbits)
    return xp.where(r >= 2.0 ** (1 - bias), nrm, sub) | (xp.astype(neg, xp.int32) << sign)


def _unblock(xb: Array, K: int) -> Array:
    """[..., nb, block] -> [..., K] (drops the padding)."""
    return xb.reshape(tuple(xb.shape[:-2]) + (xb.shape[-2] * xb.shape[-1],))[..., :K]


def _tiles(xp: SimpleNamespace, x: Array, rb: int, cb: int, fill: int = 0) -> Array:
    """[..., N, K] -> [..., ceil(N/rb), rb, ceil(K/cb), cb], padded with fill."""
    lead, (N, K) = tuple(x.shape[:-2]), tuple(x.shape[-2:])
    Np, Kp = -(-N // rb) * rb, -(-K // cb) * cb
    if (Np, Kp) != (N, K):
        z = xp.zeros(lead + (Np, Kp), x.dtype, x) + fill
        z[..., :N, :K] = x
        x = z
    return x.reshape(lead + (Np // rb, rb, Kp // cb, cb))


def _expand(xp: SimpleNamespace, s: Array, rb: int, cb: int, N: int, K: int) -> Array:
    """Per-tile [..., ceil(N/rb), ceil(K/cb)] -> per-element [..., N, K]."""
    return xp.repeat(xp.repeat(s, rb, -2)[..., :N, :], cb, -1)[..., :K]


def _e4m3_out(xp: SimpleNamespace, codes: Array) -> Array:
    codes = xp.astype(codes, xp.uint8)
    return codes.view(torch.float8_e4m3fn) if xp.torch else codes


def _mx_shapes(fn: str, w: Any, w_scale: Any) -> Tuple[SimpleNamespace, Array, Array]:
    b, sb = _bytes(w, fn, "w", _FP4_DT), _bytes(w_scale, fn, "w_scale", _E8M0_DT)
    xp = _xp(sb, fn, "w_scale", like=_xp(b))
    if b.ndim < 1 or tuple(b.shape[:-1]) != tuple(sb.shape[:-1]) or b.shape[-1] * 2 != sb.shape[-1] * 32:
        raise ValueError(f"{fn}: expected w [..., N, K/2] and w_scale [..., N, K/32] with K % 32 == 0, "
                         f"got w {tuple(b.shape)} and w_scale {tuple(sb.shape)}")
    return xp, b, sb


def as_bytes(t: Array) -> Array:
    """View a uint8/int8/float4_e2m1fn_x2/float8_e8m0fnu/float8_e4m3fn array as uint8, without copying."""
    return _bytes(t, "as_bytes", "t")


def unpack_fp4(packed: Array) -> Array:
    """Packed E2M1 bytes [..., K/2] -> uint8 codes [..., K] (low nibble = even k, high nibble = odd k)."""
    b = _bytes(packed, "unpack_fp4", "packed", _FP4_DT)
    xp = _xp(b)
    return xp.stack([b & 15, b >> 4], -1).reshape(tuple(b.shape[:-1]) + (2 * b.shape[-1],))


def pack_fp4(codes: Array) -> Array:
    """uint8 E2M1 codes [..., K] (values 0..15, K even) -> packed uint8 [..., K/2]; inverse of unpack_fp4."""
    xp = _xp(codes, "pack_fp4", "codes")
    integer = (not codes.is_floating_point() and not codes.is_complex() and codes.dtype != torch.bool) \
        if xp.torch else codes.dtype.kind in "ui"
    if not integer:
        raise TypeError(f"pack_fp4: codes must have an integer dtype, got {_dname(codes)}")
    if codes.ndim < 1 or codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4: codes must be [..., K] with K even, got shape {tuple(codes.shape)}")
    if math.prod(codes.shape):
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi > 15:
            raise ValueError(f"pack_fp4: codes must lie in 0..15, got values in {lo}..{hi}")
    c = xp.astype(codes, xp.uint8).reshape(tuple(codes.shape[:-1]) + (codes.shape[-1] // 2, 2))
    return c[..., 0] | (c[..., 1] << 4)


def decode_fp4(packed: Array, dtype: Any = "float32") -> Array:
    """Packed E2M1 bytes [..., K/2] -> values [..., K] in dtype, via a 256-entry byte -> pair table."""
    b = _bytes(packed, "decode_fp4", "packed", _FP4_DT)
    xp = _xp(b)
    table = xp.astype(xp.table(_FP4_PAIRS, b), _out_dtype(xp, dtype, "decode_fp4"))
    return xp.take(table, b).reshape(tuple(b.shape[:-1]) + (2 * b.shape[-1],))


def e8m0_to_float(scale: Array) -> Array:
    """E8M0 bytes (uint8 or float8_e8m0fnu) -> float32 2^(b-127); byte 255 -> NaN."""
    b = _bytes(scale, "e8m0_to_float", "scale", _E8M0_DT)
    return _lut(_xp(b), _E8M0, b)


def float_to_e8m0(x: Array) -> Array:
    """Exact powers of two in [2^-127, 2^127] -> uint8 E8M0 bytes; anything else raises ValueError."""
    xp, f = _as_f32(x, "float_to_e8m0", "x")
    bits = f.view(xp.int32)
    ex = (bits >> 23) & 0xFF
    ok = ((bits > 0) & ((bits & 0x7FFFFF) == 0) & (ex <= 254)) | (bits == 0x400000)
    if _dname(x) == "float64":
        ok = ok & (xp.astype(f, x.dtype) == x)
    if not bool(ok.all()):
        bad = x[~ok].reshape(-1)
        raise ValueError(f"float_to_e8m0: x must hold exact powers of two in [2^-127, 2^127], got "
                         f"{int(bad.shape[0])} other values, e.g. {float(bad[0])!r}")
    return xp.astype(xp.where(bits == 0x400000, 0, ex), xp.uint8)


def decode_e4m3(b: Array) -> Array:
    """E4M3 (float8_e4m3fn) bytes (uint8 or float8_e4m3fn) -> float32 values; 0x7F/0xFF -> NaN."""
    b = _bytes(b, "decode_e4m3", "b", _E4M3_DT)
    return _lut(_xp(b), _E4M3, b)


def encode_e4m3(x: Array) -> Array:
    """Float values -> uint8 E4M3 bytes: round to nearest even, saturate to +-448 (inf too), NaN -> 0x7F|sign."""
    xp, f = _as_f32(x, "encode_e4m3", "x")
    nan = xp.isnan(f)
    r, neg = _grid(xp, xp.where(nan, 0.0, f), 3, -6, 448.0)
    code = xp.where(nan, 0x7F, _codes(xp, r, neg, 3, 7, 7)) | (xp.astype(f.view(xp.int32) < 0, xp.int32) << 7)
    return xp.astype(code, xp.uint8)


def dequant_mxfp4(w: Array, w_scale: Array, dtype: Any = "float32", *,
                  k_range: Optional[Tuple[int, int]] = None) -> Array:
    """MXFP4 -> values: W[..., n, k] = FP4[code[n, k]] * 2^(w_scale[n, k//32] - 127).

    w is [..., N, K/2] packed E2M1 (uint8/int8/float4_e2m1fn_x2), w_scale [..., N, K/32] E8M0 (uint8 or
    float8_e8m0fnu). Returns [..., N, K], or [..., N, k1-k0] for k_range=(k0, k1) (multiples of 32),
    touching only those columns."""
    fn = "dequant_mxfp4"
    xp, b, sb = _mx_shapes(fn, w, w_scale)
    K = 2 * b.shape[-1]
    k0, k1 = (0, K) if k_range is None else tuple(k_range)
    if not (0 <= k0 <= k1 <= K and k0 % 32 == 0 and k1 % 32 == 0):
        raise ValueError(f"{fn}: k_range must be (k0, k1) with 0 <= k0 <= k1 <= K={K}, multiples of 32, "
                         f"got {k_range!r}")
    lead = tuple(b.shape[:-1])
    v = decode_fp4(b[..., k0 // 2:k1 // 2]).reshape(lead + ((k1 - k0) // 32, 32))
    v = v * _lut(xp, _E8M0, sb[..., k0 // 32:k1 // 32])[..., None]
    return xp.astype(v.reshape(lead + (k1 - k0,)), _out_dtype(xp, dtype, fn))


def _mx_round(xp: SimpleNamespace, x32: Array, block: int) -> Tuple[Array, Array, Array, Array]:
    xb = x32.reshape(tuple(x32.shape[:-1]) + (x32.shape[-1] // block, block))
    s, sb = _pow2_ceil(xp, xp.amax(xp.abs(xb), -1), 6 * 2.0 ** -126, _INV6)
    r, neg = _grid(xp, xb / s[..., None], 1, 0, 6.0)
    return r, neg, s, sb


def quant_mxfp4(w: Array) -> Tuple[Array, Array]:
    """Float w [..., N, K] (K % 32 == 0, finite) -> (packed uint8 [..., N, K/2], E8M0 uint8 [..., N, K/32]).

    Per 1x32 block: s = 2^ceil(log2(max(amax, 6*2^-126) * float32(1/6))) in float32 (spec 2.2, the kernel's
    rule); codes = E2M1 round-to-nearest-even of clamp(w/s, -6, 6), ties to the even code. Also the packer of
    V4.1's indexer key cache (the release's fp4_act_quant QDQ of the keys, block 32, E8M0): its output is the
    MXFP4 ``k`` / ``k_scale`` of indexer_topk and indexer_scores, 68 B per key at D = 128."""
    xp, x32 = _as_f32(w, "quant_mxfp4", "w")
    if x32.ndim < 1 or x32.shape[-1] % 32:
        raise ValueError(f"quant_mxfp4: w must be [..., N, K] with K % 32 == 0, got shape {tuple(w.shape)}")
    if not bool(xp.isfinite(x32).all()):
        raise ValueError("quant_mxfp4: w must be finite, got NaN or inf")
    r, neg, _, sb = _mx_round(xp, x32, 32)
    codes = xp.astype(_codes(xp, r, neg, 1, 1, 3), xp.uint8).reshape(tuple(x32.shape))
    return pack_fp4(codes), xp.astype(sb, xp.uint8)


def fp4_fake_quant(x: Array, block: int = 32) -> Array:
    """x rounded through MXFP4 (quant_mxfp4 then dequant) along the last dim; same dtype as x (spec 2.2)."""
    xp, x32 = _as_f32(x, "fp4_fake_quant", "x")
    block = _positive(block, "fp4_fake_quant")
    if x32.ndim < 1 or x32.shape[-1] % block:
        raise ValueError(f"fp4_fake_quant: last dim must be a multiple of block={block}, got shape {tuple(x.shape)}")
    r, neg, s, _ = _mx_round(xp, x32, block)
    return xp.astype((xp.where(neg, -r, r) * s[..., None]).reshape(tuple(x.shape)), x.dtype)


def quant_fp8_block(w: Array, block: int = 128) -> Tuple[Array, Array]:
    """Float w [..., N, K] -> (E4M3 weights [..., N, K], E8M0 uint8 scales [..., ceil(N/block), ceil(K/block)]).

    Per block x block tile (edge tiles may be partial): s = 2^ceil(log2(max(amax, 1e-4) * float32(1/448))),
    w8 = E4M3-RNE(clamp(w/s, +-448)). Weights come back as torch.float8_e4m3fn, or uint8 bytes for NumPy."""
    fn = "quant_fp8_block"
    xp, x32 = _as_f32(w, fn, "w")
    block = _positive(block, fn)
    if x32.ndim < 2:
        raise ValueError(f"{fn}: w must be [..., N, K], got shape {tuple(w.shape)}")
    if not bool(xp.isfinite(x32).all()):
        raise ValueError(f"{fn}: w must be finite, got NaN or inf")
    N, K = x32.shape[-2:]
    t = _tiles(xp, x32, block, block)
    s, sb = _pow2_ceil(xp, xp.amax(xp.abs(t), (-3, -1)), 1e-4, _INV448)
    r, neg = _grid(xp, x32 / _expand(xp, s, block, block, N, K), 3, -6, 448.0)
    return _e4m3_out(xp, _codes(xp, r, neg, 3, 7, 7)), xp.astype(sb, xp.uint8)


def dequant_fp8_block(w: Array, scale: Array, block: int = 128, dtype: Any = "float32") -> Array:
    """E4M3 w [..., N, K] (float8_e4m3fn or uint8 bytes) times its per-tile scale -> values [..., N, K].

    scale is [..., ceil(N/block), ceil(K/block)], either E8M0 (uint8 / float8_e8m0fnu) or float values
    (float32 in the -Base checkpoints)."""
    fn = "dequant_fp8_block"
    b = _bytes(w, fn, "w", _E4M3_DT)
    xp, block = _xp(scale, fn, "scale", like=_xp(b)), _positive(block, fn)
    if _dname(scale) in _E8M0_DT:
        s = _lut(xp, _E8M0, _bytes(scale, fn, "scale", _E8M0_DT))
    else:
        s = _as_f32(scale, fn, "scale")[1]
    N, K = b.shape[-2:] if b.ndim >= 2 else (None, None)
    if N is None or tuple(s.shape) != tuple(b.shape[:-2]) + (-(-N // block), -(-K // block)):
        raise ValueError(f"{fn}: expected w [..., N, K] and scale [..., ceil(N/{block}), ceil(K/{block})], "
                         f"got w {tuple(b.shape)} and scale {tuple(scale.shape)}")
    v = _lut(xp, _E4M3, b) * _expand(xp, s, block, block, N, K)
    return xp.astype(v, _out_dtype(xp, dtype, fn))


def _act_quant(x: Array, block: int, fn: str) -> Tuple[SimpleNamespace, Array, Array]:
    xp, x32 = _as_f32(x, fn, "x")
    block = _positive(block, fn)
    if x32.ndim < 1:
        raise ValueError(f"{fn}: x must be [..., K], got a 0-d array")
    lead, K = tuple(x32.shape[:-1]), x32.shape[-1]
    nb = -(-K // block)
    if nb * block != K:
        z = xp.zeros(lead + (nb * block,), xp.float32, x32)
        z[..., :K] = x32
        x32 = z
    xb = x32.reshape(lead + (nb, block))
    s, _ = _pow2_ceil(xp, xp.amax(xp.abs(xb), -1), 1e-4, _INV448)
    return xp, xb / s[..., None], s


def act_quant_fp8(x: Array, block: int = 128) -> Tuple[Array, Array]:
    """The official act_quant (ue8m0 scales): x [..., K] -> (q float32 [..., K], s float32 [..., ceil(K/block)]).

    Per row and block-wide K block (the last one may be partial): s = 2^ceil(log2(max(amax, 1e-4) / 448)),
    computed in float32 exactly as the kernel does (amax * float32(1/448), ceil-log2 from the bits), so every
    backend gets bit-identical scales; q = E4M3-RNE(clamp(x/s, +-448)), returned as float32 values that are
    exactly representable in E4M3. x ~= q * s."""
    xp, q, s = _act_quant(x, block, "act_quant_fp8")
    r, neg = _grid(xp, _unblock(q, x.shape[-1]), 3, -6, 448.0)
    return xp.where(neg, -r, r), s


def fp8_fake_quant(x: Array, block: int) -> Array:
    """act_quant_fp8(x, block) multiplied back (q * s); same dtype as x (spec 3.1: block 64 on the nope dims)."""
    xp, q, s = _act_quant(x, block, "fp8_fake_quant")
    r, neg = _grid(xp, q, 3, -6, 448.0)
    return xp.astype(xp.contig(_unblock(xp.where(neg, -r, r) * s[..., None], x.shape[-1])), x.dtype)


def fp4_to_fp8_tiles(w_packed: Array, w_scale: Array, *, check_lossless: bool = True) -> Tuple[Array, Array]:
    """Lossless MXFP4 -> FP8 block conversion of spec 1.5 (official cast_e2m1fn_to_e4m3fn, any N and K % 32 == 0).

    w_packed [..., N, K/2], w_scale [..., N, K/32] -> (E4M3 w8 [..., N, K] (torch.float8_e4m3fn, or uint8
    for NumPy), E8M0 uint8 scale8 [..., ceil(N/128), ceil(K/128)]). Per 128x128 tile S = max s32 / 2^6
    (byte clamped at 0, i.e. S >= 2^-127), w8 = fp4 * (s32 / S). Exact while every 32-block holding a
    nonzero code has s32 >= 2^-14 * max s32 of its tile; else ValueError, unless check_lossless=False
    (then w8 is the E4M3 RNE of the exact product)."""
    fn = "fp4_to_fp8_tiles"
    xp, b, sb = _mx_shapes(fn, w_packed, w_scale)
    if b.ndim < 2:
        raise ValueError(f"{fn}: w_packed must be [..., N, K/2], got shape {tuple(b.shape)}")
    lead, N, nb = tuple(b.shape[:-2]), b.shape[-2], sb.shape[-1]
    e = xp.astype(sb, xp.int32)
    if bool((e == 255).any()):
        raise ValueError(f"{fn}: w_scale must not hold NaN (E8M0 byte 255)")
    smax = xp.amax(_tiles(xp, e, 128, 4), (-3, -1))
    S = xp.clip(smax - 6, 0, None)
    v = decode_fp4(b).reshape(lead + (N, nb, 32))
    if check_lossless:
        nz = xp.amax(xp.astype(unpack_fp4(b) & 7, xp.int32).reshape(lead + (N, nb, 32)), -1) > 0
        smin = xp.amin(_tiles(xp, xp.where(nz, e, 255), 128, 4, fill=255), (-3, -1))
        span = smax - smin
        if bool((span > 14).any()):
            raise ValueError(f"{fn}: a 128x128 tile's per-32 scales span 2^{int(span.max())} > 2^14 (among blocks "
                             f"with nonzero codes), so E4M3 cannot hold it exactly; pass check_lossless=False to round")
    d = xp.clip(e - _expand(xp, S, 128, 4, N, nb), -126, None)
    r, neg = _grid(xp, v * ((d + 127) << 23).view(xp.float32)[..., None], 3, -6, 448.0)
    w8 = _codes(xp, r, neg, 3, 7, 7).reshape(lead + (N, 32 * nb))
    return _e4m3_out(xp, w8), xp.astype(S, xp.uint8)


def round_float(x: Array, dtype: Any) -> Array:
    """The float32 values of ``x`` rounded to ``dtype`` (bfloat16 / float16, round to nearest even) and
    returned as float32; ``float32`` (or None) returns ``x`` as float32 unchanged. Torch tensors and NumPy
    arrays alike: the precision points of the ops (P before P.V, the indexer's bf16 sums)."""
    xp, x32 = _as_f32(x, "round_float", "x")
    name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "") if dtype is not None else "float32"
    if name == "float32":
        return x32
    if name not in ("bfloat16", "float16"):
        raise TypeError(f"round_float: dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if xp.torch:
        return x32.to(getattr(torch, name)).float()
    if name == "float16":
        with np.errstate(over="ignore"):
            return x32.astype(np.float16).astype(np.float32)
    bits = np.ascontiguousarray(x32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000))
    rounded = np.where(np.isnan(x32), bits | np.uint32(0x00400000), rounded)   # NaN stays a (quiet) NaN
    return rounded.astype(np.uint32).view(np.float32)


ORDER_KEY_FLOOR = -(1 << 31)
"""An int32 key below :func:`order_key` of every float32, -inf included (int32 min): for masked-out entries."""


def order_key(x: Array) -> Array:
    """int32 keys that sort as the float32 values of ``x`` do: ``a < b`` (as floats, -0.0 just below +0.0)
    iff ``key(a) < key(b)``; -inf maps to ``-2**31 + 0x7FFFFF``, above ``ORDER_KEY_FLOOR``. NaN has no
    place in the order: callers map it first. The
    bits of the float are reordered (sign-magnitude to two's complement), the same key Triton's top-k
    select ranks on. Torch tensors and NumPy arrays alike."""
    xp, x32 = _as_f32(x, "order_key", "x")
    bits = xp.contig(x32).view(xp.int32)
    return xp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


__all__ = ["FP4_VALUES", "round_float", "order_key", "ORDER_KEY_FLOOR", "as_bytes", "unpack_fp4", "pack_fp4", "decode_fp4", "e8m0_to_float", "float_to_e8m0",
           "decode_e4m3", "encode_e4m3", "dequant_mxfp4", "quant_mxfp4", "fp4_fake_quant", "quant_fp8_block",
           "dequant_fp8_block", "act_quant_fp8", "fp8_fake_quant", "fp4_to_fp8_tiles"]

_KV_NAMES = ("pack_kv_fp8", "unpack_kv_fp8", "pack_kv_fp4", "unpack_kv_fp4", "qdq_kv_fp8", "qdq_kv_fp4",
             "kv_fp8_row_bytes", "kv_fp4_row_bytes")
__all__ += list(_KV_NAMES)


def __getattr__(name: str) -> Any:
    """The V4.1 KV-cache formats live in dsv4rt.kv_formats (built on the helpers here); re-exported lazily
    so that either module may be imported first."""
    if name in _KV_NAMES:
        from . import kv_formats
        return getattr(kv_formats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
