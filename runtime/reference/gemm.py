"""Golden GEMMs: fp4_gemm, fp4_grouped_gemm, fp8_gemm (spec sections 1.3-1.5), float64 throughout."""

import torch

from ._decode import F64, dequant_fp4, dequant_fp8, to_f64

FP8_MAX = 448.0
ACT_BLOCK = 128
_INV_FP8_MAX_F32 = torch.tensor(1.0 / FP8_MAX, dtype=torch.float32)


def _ceil_log2_exact(r):
    """Exact ``ceil(log2(r))`` of positive float32 values, as an int64 tensor.

    This is what the official kernel's ``fast_log2_ceil`` computes from the float32 bits
    (exponent, +1 when the mantissa is non-zero). ``torch.log2`` in float32 is NOT used: it rounds
    ``log2(2^k * (1 + 2^-23))`` to exactly ``k`` for many k, which would give a scale one binade too
    small (and then clamp) for amax values a few ulps above ``448 * 2^k``.
    """
    mant, exp = torch.frexp(r.to(F64))  # r = mant * 2^exp, mant in [0.5, 1); exact in float64
    e = torch.where(mant == 0.5, exp - 1, exp).to(torch.int64)
    # Inf / NaN (a block holding Inf or NaN): exponent field 255, so the kernel's scale is 2^128 = inf in
    # float32 and the whole block quantises to NaN (frexp alone would give a finite scale)
    return torch.where(torch.isfinite(r), e, torch.full_like(e, 128))


def act_quant_fp8(x, block=ACT_BLOCK):
    """The official ``act_quant`` (spec 1.5) as a fake-quant: returns float64 ``q(x)`` [M, K].

    Per row, per ``block``-wide K block (the last block may be partial), all in float32 like the
    kernel:

    * ``amax = max(|x.float()|)`` over the block, ``amax = max(amax, 1e-4)``;
    * ``r = amax * float32(1/448)`` (float32 product; for every float32 amax this gives the same
      ``ceil(log2(.))`` as ``amax / 448``);
    * ``s = 2^ceil(log2(r))`` with the exact ceil of the float32 value ``r`` (the kernel's bit trick),
      i.e. the smallest power of two with ``r <= s``;
    * ``q = e4m3(clamp(x.float() / s, -448, 448)) * s``, rounding with torch's
      ``.to(torch.float8_e4m3fn)`` (round to nearest even) on the exact float32 quotient.
    """
    x32 = x.to(torch.float32)
    m, k = x32.shape
    out = torch.empty((m, k), dtype=F64)
    for k0 in range(0, k, block):
        xb = x32[:, k0:k0 + block]
        amax = torch.clamp(xb.abs().amax(dim=1, keepdim=True), min=1e-4)
        r = amax * _INV_FP8_MAX_F32
        s = torch.exp2(_ceil_log2_exact(r).to(F64)).to(torch.float32)  # power of two, exact
        y = torch.clamp(xb / s, -FP8_MAX, FP8_MAX)                      # exact: s is 2^e
        out[:, k0:k0 + block] = y.to(torch.float8_e4m3fn).to(F64) * s.to(F64)
    return out


def act_scales_fp8(x, block=ACT_BLOCK):
    """The power-of-two scales ``s[M, ceil(K/block)]`` (float64) that ``act_quant_fp8`` uses."""
    x32 = x.to(torch.float32)
    cols = []
    for k0 in range(0, x32.shape[1], block):
        amax = torch.clamp(x32[:, k0:k0 + block].abs().amax(dim=1), min=1e-4)
        cols.append(torch.exp2(_ceil_log2_exact(amax * _INV_FP8_MAX_F32).to(F64)))
    return torch.stack(cols, dim=1)


def _quantize_activation(x, act_quant, block=ACT_BLOCK):
    if act_quant is None:
        return to_f64(x)
    if act_quant == "fp8":
        return act_quant_fp8(x, block)
    raise NotImplementedError(f"reference: act_quant={act_quant!r} is not a v1 mode")


def fp4_gemm(x, w, w_scale, act_quant=None, act_block_size=ACT_BLOCK):
    """``y[M, N] = q(x) @ W.T`` in float64.

    * ``W[n, k] = E2M1(code[n, k]) * 2^(w_scale[n, k // 32] - 127)`` (spec 1.1-1.3): ``w [N, K/2]``
      holds element 2j in the low nibble of byte j and 2j+1 in the high nibble; ``w`` may be uint8,
      int8 or float4_e2m1fn_x2, ``w_scale [N, K/32]`` uint8 or float8_e8m0fnu.
    * ``q(x) = x`` (as float64) when ``act_quant is None``; with ``act_quant="fp8"`` it is the
      official per-1 x ``act_block_size`` power-of-two E4M3 fake-quant, see :func:`act_quant_fp8`
      (spec 1.5; 128 for V4, 32 for V4.1, whose ``linear()`` passes ``act_block_size=fp8_block_size``).
    * The product is exact-ish float64 (no fp32 accumulation): the oracle for all backends.
    """
    xq = _quantize_activation(x, act_quant, act_block_size)
    wd = dequant_fp4(w, w_scale)
    return xq @ wd.T


def fp4_grouped_gemm(x, w, w_scale, offsets, act_quant=None, act_block_size=ACT_BLOCK):
    """Per-expert :func:`fp4_gemm`: ``y[r] = fp4_gemm(x[r], w[e], w_scale[e], act_quant, act_block_size)`` for
    ``offsets[e] <= r < offsets[e+1]``.

    ``x [R, K]`` rows grouped by expert, ``w [E, N, K/2]``, ``w_scale [E, N, K/32]``,
    ``offsets [E+1]`` int32 (empty experts allowed). Returns float64 ``[R, N]``; rows not covered by
    any expert range (none when offsets[E] == R) stay 0. The activation quantisation is per row, so
    it does not depend on the grouping.
    """
    num_experts, n = w.shape[0], w.shape[1]
    y = torch.zeros((x.shape[0], n), dtype=F64)
    off = [int(v) for v in offsets.tolist()]
    for e in range(num_experts):
        lo, hi = off[e], off[e + 1]
        if hi > lo:
            y[lo:hi] = fp4_gemm(x[lo:hi], w[e], w_scale[e], act_quant, act_block_size)
    return y


def fp8_gemm(x, w, w_scale, act_quant=None, block_size=ACT_BLOCK):
    """``y[M, N] = q(x) @ W.T`` in float64 with the dense FP8 weight format (spec 1.4/1.5).

    ``W[n, k] = e4m3(w[n, k]) * scale[n // bs, k // bs]`` with ``bs = block_size`` (128 for V4, 32 for
    V4.1); ``w [N, K]`` float8_e4m3fn, ``w_scale [ceil(N/bs), ceil(K/bs)]`` E8M0 (uint8 bytes or
    float8_e8m0fnu, value 2^(b-127)) or float32 (taken as is). ``q`` as in :func:`fp4_gemm` with 1 x bs
    activation blocks. The official kernel's ``sum_kb (A_kb . W_kb^T) * sa[m, kb] * sw[n // bs, kb]`` is
    this product, computed exactly here (the scales are factored out of each block sum).
    """
    xq = _quantize_activation(x, act_quant, block_size)
    wd = dequant_fp8(w, w_scale, block_size)
    return xq @ wd.T
