"""``ascend/fused`` sparse_attention: the sliding window through ``npu_fused_infer_attention_score`` (FIA),
the rest of the selected entries through the composite code, merged exactly by log-sum-exp.

Why a split: no torch_npu op in 2.14 takes V4's gathered-index attention with a per-head sink at D = 512
(``npu_sparse_attn_sharedkv`` lives in vllm-ascend's csrc, not in torch_npu; FIA's ``learnable_sink``
needs D <= 128; docs/ascend.md section 4). FIA does take the window: a causal band of consecutive kv
rows (prefill, ``sparse_mode=4`` with ``pre_tokens = W - 1``, ``next_tokens = 0``) or a prefix of the
ring buffer (decode, ``actual_seq_lengths_kv``), D up to 512, and returns the softmax LSE.

Why the merge is exact: the contract's one softmax over ``window ∪ rest ∪ {sink}`` factors as
``lse = log(e^lse_w + e^lse_r)``, ``o = o_w e^(lse_w - lse) + o_r e^(lse_r - lse)`` (each partial is a
softmax-weighted mean over a disjoint set of idx columns, duplicates included), then the sink:
``lse' = log(e^lse + e^sink)``, ``o' = o e^(lse - lse')`` (docs/ascend.md section 4). The merge runs in
fp32; the only extra rounding is FIA's output in q's dtype (one rounding of the window partial, inside the
contract's P-rounding allowance). The rest is computed in fp32 by the composite code (``q.float()``).

Not settled by the documentation: FIA with ``softmax_lse_flag=True`` at D = 512. The op documents D <= 512
(with N * D < 65535 for BSND: 64 heads per call) and the LSE output ([B, N, S, 1] float32) without naming
a head-dim limit for it, and no public caller uses that pair (vllm-ascend's D = 512 path is its own csrc
kernel). It is neither allowed nor forbidden; the fused variant relies on it, so the first hardware run
must compare it with the composite variant (docs/ascend.md, "Only on hardware").

How the window is known: the contract's ``idx`` does not say which columns form the window, and finding
out would need a device->host sync. So the caller declares it by passing a
:class:`dsv4rt.ops.attention.WindowedIndex` (backend-neutral: the same int32 tensor with a ``Window``
attached; the contract check and every other variant see a plain idx). The model declares it for lockstep
prefill from position 0 and one-token decode (runtime/model/attention.py ``_attend``). A plain idx is
refused by ``supports()`` and the composite variant runs. The declaration is trusted, not checked (that
would sync); ``WindowedIndex.verify`` checks it, for tests and debugging.

kv_compress has no fused variant: ``ascend/torch`` (the composite code) runs every mode, V4's and V4.1's
(ratio 2 without ape, ratio 1 without gate). No torch_npu op fits the per-channel softmax pooling
(docs/ascend.md): the compressor kernel there is vllm-ascend's ``torch.ops._C_ascend.compressor``, a csrc
op outside torch_npu that also fuses the projections, the norm and RoPE, i.e. model glue here.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from dsv4rt.ops.attention import Window, WindowedIndex

from ._npu import Features

__all__ = ["Window", "WindowedIndex", "register", "make_sparse_attention", "supports_attention", "band_mask",
           "MAX_HEADS_PER_CALL"]

log = logging.getLogger("dsv4rt")
MAX_HEADS_PER_CALL = 64
"""FIA: num_heads / num_key_value_heads <= 64, so with one shared K=V head, at most 64 heads per call."""
MAX_HEADS, MAX_D, MAX_KV_DECODE = 256, 512, 262144


def window_reason(a: Mapping[str, Any]) -> str | None:
    idx, q, kv = a["idx"], a["q"], a["kv"]
    if not isinstance(idx, WindowedIndex):
        return ("idx declares no window (pass a dsv4rt.ops.attention.WindowedIndex): FIA needs the "
                "window as a band or prefix of kv rows, which a plain idx cannot show without a host sync")
    w, (b, s), n = idx.window, q.shape[:2], kv.shape[1]
    if not 1 <= w.width <= idx.shape[2]:
        return f"window width {w.width} not in [1, K = {idx.shape[2]}]"
    if w.valid is None:
        if s < 2:
            return "a prefill window needs S > 1 queries (use WindowedIndex.decode for S = 1)"
        if w.first_row < 0 or w.first_row + s > n:
            return f"prefill window rows {w.first_row}..{w.first_row + s - 1} lie outside kv's N = {n} rows"
        return None
    if s != 1:
        return f"a decode window needs S = 1, got S = {s}"
    if len(w.valid) != b or not all(1 <= v <= w.width for v in w.valid):
        return f"decode window: valid must hold {b} counts in [1, {w.width}], got {w.valid}"
    if w.first_row < 0 or w.first_row + w.width > n:
        return f"decode window rows {w.first_row}..{w.first_row + w.width - 1} lie outside kv's N = {n} rows"
    return None


def supports_attention(feat: Features) -> Callable[[Mapping[str, Any]], str | None]:
    """FIA limits (op-plugin torch_npu-npu_fused_infer_attention_score.md) and the window declaration."""
    def supports(a: Mapping[str, Any]) -> str | None:
        q, kv = a["q"], a["kv"]
        if a.get("kv_format") is not None:
            return (f"kv_format={a['kv_format']!r}: no torch_npu op takes the V4.1 packed KV cache (FP8 E4M3 rows "
                    f"with a UE8M0 scale per 32 over all D, FP4 E2M1 rows with an E4M3 scale per 16; docs/ascend.md "
                    f"section 4: the quantised-KV kernel npu_kv_quant_sparse_attn_sharedkv is vllm-ascend csrc, "
                    f"950 only, and packs [rope bf16 | nope fp8 | E8M0] instead); the composite variant decodes "
                    f"the gathered rows")
        if feat.soc not in ("A2", "A3", "950"):
            return f"SoC {feat.soc}: npu_fused_infer_attention_score runs on A2, A3 and 950"
        if q.dtype not in (torch.bfloat16, torch.float16):
            return f"q is {q.dtype}; FIA takes float16 or bfloat16 queries"
        if kv.dtype != q.dtype:
            return f"kv is {kv.dtype}; FIA needs key/value in q's dtype ({q.dtype})"
        h, d = q.shape[2], q.shape[3]
        if d > MAX_D or d % 8:
            return f"D = {d}: FIA needs D <= {MAX_D}, 16-byte aligned (a multiple of 8 for 2-byte types)"
        if h > MAX_HEADS:
            return f"H = {h} heads > {MAX_HEADS} (FIA limit)"
        if a.get("p_dtype") not in (None, kv.dtype):
            return (f"p_dtype {a['p_dtype']}: FIA forms P inside the kernel for {kv.dtype} inputs; only the "
                    f"default (P in the kv dtype) maps onto it")
        return window_reason(a)
    return supports


@functools.lru_cache(maxsize=8)
def band_mask(device: torch.device) -> Tensor:
    """FIA's "optimized" mask for sparse_mode 2/3/4: bool [2048, 2048], True above the diagonal."""
    return torch.triu(torch.ones(2048, 2048, dtype=torch.bool, device=device), diagonal=1)


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    m = torch.maximum(a, b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m + torch.log(torch.exp(a - m) + torch.exp(b - m))


def make_sparse_attention(npu: Any, feat: Features, fallback: Callable[..., Any]) -> Callable[..., Any]:
    supports = supports_attention(feat)

    def window_part(q: Tensor, kv: Tensor, w: Window, scale: float) -> tuple[Tensor, Tensor]:
        b, s, h, d = q.shape
        if w.valid is None:
            keys = kv[:, w.first_row:w.first_row + s].unsqueeze(2).contiguous()        # [B, S, 1, D]
            extra = dict(atten_mask=band_mask(q.device), sparse_mode=4, pre_tokens=w.width - 1, next_tokens=0)
        else:
            keys = kv[:, w.first_row:w.first_row + w.width].unsqueeze(2).contiguous()  # [B, W, 1, D]
            extra = dict(actual_seq_lengths_kv=list(w.valid))
        o = torch.empty((b, s, h, d), dtype=q.dtype, device=q.device)
        lse = torch.empty((b, s, h), dtype=torch.float32, device=q.device)
        for h0 in range(0, h, MAX_HEADS_PER_CALL):
            h1 = min(h, h0 + MAX_HEADS_PER_CALL)
            out, lse_h = npu.npu_fused_infer_attention_score(
                q[:, :, h0:h1].contiguous(), keys, keys, num_heads=h1 - h0, scale=float(scale),
                input_layout="BSND", num_key_value_heads=1, softmax_lse_flag=True, **extra)
            o[:, :, h0:h1] = out
            lse[:, :, h0:h1] = lse_h.reshape(b, h1 - h0, s).transpose(1, 2)               # [B, N, S, 1] -> [B, S, N]
        return o, lse

    def sparse_attention(q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor | None, scale: float,
                         return_lse: bool = False, p_dtype: torch.dtype | None = None,
                         kv_format: str | None = None, kv_global: Tensor | None = None):
        reason = supports({"q": q, "kv": kv, "idx": idx, "sink": sink, "scale": scale, "return_lse": return_lse,
                           "p_dtype": p_dtype, "kv_format": kv_format, "kv_global": kv_global})
        if reason:  # the selection cache ignores the WindowedIndex type: re-check (no sync) and fall back
            log.info("dsv4rt: ascend/fused sparse_attention -> composite: %s", reason)
            return fallback(q, kv, idx, sink, scale, return_lse, p_dtype, kv_format, kv_global)
        w = idx.window
        o_w, lse = window_part(q, kv, w, scale)
        o = o_w.float()
        rest = idx.as_subclass(Tensor)[..., w.width:]
        if rest.shape[2]:
            o_r, lse_r = fallback(q.float(), kv, rest, None, scale, True, kv.dtype if p_dtype is None else p_dtype)
            total = _logaddexp(lse, lse_r)
            o = o * torch.exp(lse - total)[..., None] + o_r * torch.exp(lse_r - total)[..., None]
            lse = total
        if sink is not None:
            total = _logaddexp(lse, sink.float()[None, None, :])
            o = o * torch.exp(lse - total)[..., None]
            lse = total
        o = o.to(q.dtype)
        return (o, lse) if return_lse else o

    return sparse_attention


def register(registrar: Any, npu: Any, feat: Features, priority: int, device_type: str) -> None:
    from dsv4rt.backends.composite import attention as composite

    if feat.has("npu_fused_infer_attention_score"):
        registrar.implement("sparse_attention", "fused",
                            make_sparse_attention(npu, feat, composite.sparse_attention), priority=priority,
                            requires=("npu_fused_infer_attention_score",), device_type=device_type,
                            supports=supports_attention(feat))
