"""A CPU stand-in for the official DeepSeek-V4.1 ``inference/kernel.py`` (TileLang, GPU only), in plain torch.

tools/oracle_v41.py registers this module as ``kernel`` (and ``<package>.kernel`` / ``kernel_cpu``) before it
imports the official ``model.py``, which calls exactly these six functions with these signatures.

Semantics (the kernel's, as its call sites in model.py and the kernel line citations of public ports state):

* ``act_quant(x, block, scale_fmt, scale_dtype, inplace)``: per ``block`` elements of the last dim,
  ``amax = max(|x|, 1e-4)``; scale ``s = amax * fp32(1/448)``, rounded up to a power of two when ``scale_fmt``
  is set (ceil of log2 of that fp32 product); ``q = e4m3_rne(clamp(x / s, +-448))``. ``inplace`` writes
  ``q * s`` back into ``x`` (quantise-dequantise) and returns it; else returns ``(q, s as scale_dtype)``.
* ``fp4_act_quant(x, block, inplace, scale_dtype)``: E2M1 (values 0, .5, 1, 1.5, 2, 3, 4, 6, round to nearest,
  ties to the even code) per ``block``; with E8M0 scales ``s = 2^ceil(log2(max(amax, 6*2^-126) * fp32(1/6)))``,
  with E4M3 scales ``s = e4m3_rne(max(amax, 6*2^-9) / 6)``; ``q = e2m1(clamp(x / s, +-6))``.
* ``fp8_gemm`` / ``fp4_gemm``: ``C = sum over K blocks of 32 (A_kb . B_kb^T) * a_s[m, kb] * b_s[.., kb]`` in
  fp32, K blocks added in order; FP8 weight scales per 32x32 (``b_s[n // block, kb]``), FP4 per row per 32
  (packed two per byte, even element in the low nibble); the result in torch's default dtype.
* ``sparse_attn(q, kv, sink, idx, scale)``: one K=V head; for each query the entries ``idx`` (``-1`` = none),
  softmax over ``scale * q . kv`` plus an unscaled sink logit in the denominator only; blocks of 64 indices
  with an online (running-max) softmax whose probabilities are rounded to bf16 before P.V; bf16 output.
* ``hc_split_sinkhorn``: ``pre = sigmoid(m0 * s0 + b0) + eps``, ``post = 2 sigmoid(m1 * s1 + b1)``,
  ``comb = softmax_rows(m2 * s2 + b2) + eps``, then column-normalised, then ``iters - 1`` times rows then
  columns (each sum + eps), all fp32.

``MODE = "fp32"`` (set by the oracle's fp32 precision) makes the in-place quantise-dequantise calls identity
and keeps ``sparse_attn`` in fp32 (no bf16 probabilities, output in q's dtype): the quantisation the model
code cannot switch off itself. The returning (non in-place) forms always quantise: they feed FP8/FP4 GEMMs.
"""
from __future__ import annotations

import torch
from torch import Tensor

MODE = "release"
ALT_ORDER = False
"""True: the GEMM and attention products accumulate in float64 before rounding (another summation order, for
the oracle's noise floor: how far the same semantics move under last-bit differences)."""
FP8_MAX, FP4_MAX = 448.0, 6.0
_INV448 = torch.tensor(1.0 / 448.0, dtype=torch.float32)
_INV6 = torch.tensor(1.0 / 6.0, dtype=torch.float32)
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
ATTN_BLOCK = 64


def _pow2_ceil(x: Tensor) -> Tensor:
    """2^ceil(log2(x)) for positive fp32 x, exactly (frexp: x = f * 2^e with f in [0.5, 1))."""
    f, e = torch.frexp(x)
    return torch.ldexp(torch.ones_like(x), (e - (f == 0.5).to(e.dtype)).to(torch.float32))


def _e4m3(x: Tensor) -> Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _e2m1_value(v: Tensor) -> Tensor:
    """Nearest E2M1 value of v in [-6, 6], ties to the even code: within each binade the grid step is
    uniform (0.5 below 2, 1 below 4, 2 up to 6), and the binade edges are grid points, so rounding half to
    even in units of the step is the nearest-even code."""
    a = v.abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return torch.copysign(torch.round(a / step) * step, v)


def _e2m1_code(v: Tensor) -> Tensor:
    """4-bit code (bit 3 = sign) of the E2M1 value v."""
    mag = torch.searchsorted(_E2M1, v.abs().contiguous())
    return mag.to(torch.uint8) | (torch.signbit(v).to(torch.uint8) << 3)


def _groups(x: Tensor, block: int) -> Tensor:
    if x.size(-1) % block:
        raise ValueError(f"quantiser: last dim {x.size(-1)} is not a multiple of the block {block}")
    return x.float().unflatten(-1, (-1, block))


def act_quant(x: Tensor, block_size: int = 128, scale_fmt: str | None = None,
              scale_dtype: torch.dtype = torch.float32, inplace: bool = False):
    """Per-block FP8 E4M3 quantisation (see the module docstring)."""
    if inplace and MODE == "fp32":
        return x
    g = _groups(x, block_size)
    s = g.abs().amax(-1).clamp_min(1e-4) * _INV448
    if scale_fmt is not None:
        s = _pow2_ceil(s)
    q = _e4m3(g / s.unsqueeze(-1))
    if inplace:
        x.copy_((q.float() * s.unsqueeze(-1)).flatten(-2))
        return x
    return q.flatten(-2), s.to(scale_dtype)


def fp4_act_quant(x: Tensor, block_size: int = 32, inplace: bool = False,
                  scale_dtype: torch.dtype = torch.float8_e8m0fnu):
    """Per-block FP4 E2M1 quantisation with E8M0 or E4M3 scales (see the module docstring)."""
    if inplace and MODE == "fp32":
        return x
    g = _groups(x, block_size)
    amax = g.abs().amax(-1)
    if scale_dtype == torch.float8_e4m3fn:
        s = _e4m3(amax.clamp_min(6 * 2.0 ** -9) / FP4_MAX).float()
    elif scale_dtype == torch.float8_e8m0fnu:
        s = _pow2_ceil(amax.clamp_min(6 * 2.0 ** -126) * _INV6)
    else:
        raise ValueError(f"fp4_act_quant: scale_dtype {scale_dtype} (float8_e8m0fnu or float8_e4m3fn)")
    v = _e2m1_value((g / s.unsqueeze(-1)).clamp(-FP4_MAX, FP4_MAX))
    if inplace:
        x.copy_((v * s.unsqueeze(-1)).flatten(-2))
        return x
    codes = _e2m1_code(v).flatten(-2)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
    return packed.view(torch.float4_e2m1fn_x2), s.to(scale_dtype)


_SIGNED = torch.cat([_E2M1, -_E2M1])
_BYTE_PAIRS = torch.stack([_SIGNED[torch.arange(256) & 15], _SIGNED[torch.arange(256) >> 4]], -1)  # [256, 2]


def _unpack_fp4(w: Tensor) -> Tensor:
    """Packed E2M1 bytes [.., K/2] -> fp32 [.., K]: the low nibble holds the even element."""
    return _BYTE_PAIRS[w.view(torch.uint8).long()].flatten(-2)


def _blocked_gemm(a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, block: int) -> Tensor:
    """sum_kb (a_kb @ b_kb^T) * sa[:, kb] * sb[:, kb], fp32, K blocks accumulated in order."""
    m, k = a.shape
    acc = torch.zeros(m, b.size(0), dtype=torch.float32)
    for kb in range(k // block):
        cols = slice(kb * block, (kb + 1) * block)
        part = (a[:, cols].double() @ b[:, cols].double().T).float() if ALT_ORDER else a[:, cols] @ b[:, cols].T
        acc += part * sa[:, kb:kb + 1] * sb[:, kb][None, :]
    return acc


def fp8_gemm(a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, scale_dtype: torch.dtype = torch.float32,
             block_size: int = 128) -> Tensor:
    """A[.., K] (E4M3, per-block act scales) x B[N, K]^T (E4M3, block x block scales) -> default dtype."""
    k, n = a.size(-1), b.size(0)
    m = a.numel() // k
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn or k % block_size:
        raise ValueError(f"fp8_gemm: a {a.dtype} {tuple(a.shape)}, b {b.dtype} {tuple(b.shape)}, block {block_size}")
    sb = b_s.float().repeat_interleave(block_size, 0)[:n]
    c = _blocked_gemm(a.reshape(m, k).float(), a_s.reshape(m, -1).float(), b.float(), sb, block_size)
    return c.to(torch.get_default_dtype()).view(*a.shape[:-1], n)


def fp4_gemm(a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, scale_dtype: torch.dtype = torch.float32,
             act_block_size: int = 128) -> Tensor:
    """A[.., K] (E4M3, per-act_block scales) x B[N, K/2] (packed E2M1, E8M0 per row per 32)^T -> default dtype."""
    k, n = a.size(-1), b.size(0)
    m = a.numel() // k
    if a.dtype != torch.float8_e4m3fn or b.dtype != torch.float4_e2m1fn_x2 or k % act_block_size:
        raise ValueError(f"fp4_gemm: a {a.dtype} {tuple(a.shape)}, b {b.dtype} {tuple(b.shape)}")
    sa = a_s.reshape(m, -1).float().repeat_interleave(act_block_size // 32, 1)
    c = _blocked_gemm(a.reshape(m, k).float(), sa, _unpack_fp4(b), b_s.float(), 32)
    return c.to(torch.get_default_dtype()).view(*a.shape[:-1], n)


def sparse_attn(q: Tensor, kv: Tensor, attn_sink: Tensor, topk_idxs: Tensor, softmax_scale: float) -> Tensor:
    """q [b, m, h, d], kv [b, n, d], attn_sink [h], topk_idxs [b, m, t] (-1 = none) -> [b, m, h, d]."""
    b, m, h, d = q.shape
    release = MODE != "fp32"
    qf, kvf, scale = q.float(), kv.float(), torch.tensor(softmax_scale, dtype=torch.float32)
    run_max = torch.full((b, m, h), -1e30)
    denom = torch.zeros(b, m, h)
    acc = torch.zeros(b, m, h, d)
    rows = torch.arange(b).view(b, 1, 1)
    for t0 in range(0, topk_idxs.size(-1), ATTN_BLOCK):
        idx = topk_idxs[..., t0:t0 + ATTN_BLOCK].long()
        ok = idx >= 0
        keys = kvf[rows, idx.clamp_min(0)] * ok.unsqueeze(-1)                      # [b, m, t, d]
        logits = (torch.matmul(qf.double(), keys.double().transpose(-1, -2)).float() if ALT_ORDER
                  else torch.matmul(qf, keys.transpose(-1, -2)))                     # [b, m, h, t]
        logits = torch.where(ok.unsqueeze(2), logits, float("-inf")) * scale
        new_max = torch.maximum(run_max, logits.amax(-1))
        carry = torch.exp(run_max - new_max)
        p = torch.exp(logits - new_max.unsqueeze(-1))
        denom = denom * carry + p.sum(-1)
        pv = p.to(torch.bfloat16).float() if release else p
        acc = acc * carry.unsqueeze(-1) + torch.matmul(pv, keys)
        run_max = new_max
    denom = denom + torch.exp(attn_sink.float() - run_max)
    out = acc / denom.unsqueeze(-1)
    return out.to(torch.bfloat16) if release else out.to(q.dtype)


def hc_split_sinkhorn(mixes: Tensor, hc_scale: Tensor, hc_base: Tensor, hc_mult: int = 4,
                      sinkhorn_iters: int = 20, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """mixes [.., (2 + hc) * hc] -> pre [.., hc], post [.., hc], comb [.., hc, hc] (fp32)."""
    n = hc_mult
    x, sc, base = mixes.float(), hc_scale.float(), hc_base.float()
    pre = torch.sigmoid(x[..., :n] * sc[0] + base[:n]) + eps
    post = 2 * torch.sigmoid(x[..., n:2 * n] * sc[1] + base[n:2 * n])
    c = (x[..., 2 * n:] * sc[2] + base[2 * n:]).unflatten(-1, (n, n))
    c = torch.exp(c - c.amax(-1, keepdim=True))
    c = c / c.sum(-1, keepdim=True) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(sinkhorn_iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return pre, post, c
