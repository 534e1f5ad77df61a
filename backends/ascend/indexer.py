"""``ascend/fused`` indexer_topk for decode: ``torch_npu.npu_lightning_indexer``.

Decode only (one query per sequence, ``S == 1``). npu_lightning_indexer has no compression-ratio
argument: its causal rule (``sparse_mode=3``: key ``j <= Lk - Lq + i``) is wrong for ratio-4 compressed
keys as soon as several queries run at once (docs/ascend.md section 3), and it cannot express the
contract's arbitrary per-query ``visible``. With one query per sequence the rule reduces to ``j < Lk``,
and ``actual_seq_lengths_key = visible[:, 0]`` gives exactly the contract's visibility.

Mapping: query ``[B, 1, H, 128]`` BSND (the contract's q as is), key ``[B, N, 1, 128]`` BSND (a view of the
contract's k with the single key head made explicit), weights ``[B, 1, H]``, ``sparse_count = topk``. The
op returns int32 ``[B, 1, 1, topk]`` with the valid indices first (op-plugin doc); slots at or beyond
``min(topk, visible)`` are overwritten with -1, which is the contract's padding whatever sentinel the op
leaves there (spec open point 5). The order within a row is unspecified in the contract too. With
``return_scores`` the scores of the returned keys are recomputed in fp32 from q, k and weights (the op's
``sparse_values`` have an undocumented dtype).

V4.1: 32 heads, FP4-simulated q and k and no Hadamard are all the caller's (the op scores
``sum_h w_h relu(q_h . k)`` of whatever it gets), so they map. ``sorted_output`` is a sort of the returned
row by index (-1 last). A candidate mask does not map: the op's documented arguments hold no mask (its
``sparse_mode`` is 0 = none or 3 = causal), so calls with ``candidates`` are declined and run on the
composite ``ascend/torch``. MXFP4 keys do not map either: the op takes bf16 / fp16 keys (its quantised
variant int8 / fp8 / hif8), no E2M1 with E8M0 block scales.

indexer_scores has no fused variant: ``npu_lightning_indexer`` returns at most ``sparse_count`` (<= 8192)
indices per query (with ``return_value=True``, their values), never the whole ``[B, S, N]`` score matrix,
and no other documented torch_npu op fuses the head-weighted ReLU sum; ``ascend/torch`` runs it.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from dsv4rt.formats import round_float

from ._npu import Features

__all__ = ["register", "make_indexer_topk", "supports_indexer", "valid_sparse_count"]

_QUERY = (torch.bfloat16, torch.float16)
_HEADS_950 = (8, 16, 24, 32, 64)
MAX_HEADS_A2A3 = 64


def valid_sparse_count(k: int) -> bool:
    """sparse_count: 1..2048, or 3072..8192 in steps of 1024."""
    return 1 <= k <= 2048 or (3072 <= k <= 8192 and k % 1024 == 0)


def supports_indexer(feat: Features) -> Callable[[Mapping[str, Any]], str | None]:
    """Documented limits of npu_lightning_indexer (op-plugin torch_npu-npu_lightning_indexer.md)."""
    def supports(a: Mapping[str, Any]) -> str | None:
        q, k, w = a["q"], a["k"], a["weights"]
        b, s, h, d = q.shape
        if feat.soc not in ("A2", "A3", "950"):
            return f"SoC {feat.soc}: npu_lightning_indexer runs on A2, A3 and 950"
        if s != 1:
            return (f"S = {s} queries per sequence: npu_lightning_indexer has no compression-ratio argument, so "
                    f"only decode (S = 1) maps exactly onto the contract's visible")
        if q.dtype not in _QUERY:
            return f"q is {q.dtype}; npu_lightning_indexer takes bfloat16 or float16 queries"
        if k.dtype != q.dtype:
            return f"k is {k.dtype}; the fused indexer needs keys in q's dtype ({q.dtype}), no FP8 or MXFP4 keys"
        if d != 128:
            return f"D = {d}; npu_lightning_indexer needs head dim 128"
        if feat.soc == "950" and h not in _HEADS_950:
            return f"H = {h} heads; on 950 npu_lightning_indexer takes {_HEADS_950}"
        if feat.soc != "950" and h > MAX_HEADS_A2A3:
            return f"H = {h} heads > {MAX_HEADS_A2A3} (npu_lightning_indexer limit on A2/A3)"
        if w.dtype not in (q.dtype, torch.float32):
            return (f"weights are {w.dtype} with {q.dtype} queries; npu_lightning_indexer takes weights in the "
                    f"query's dtype (or float32 on A2/A3); casting would round")
        if feat.soc == "950" and w.dtype == torch.float32:
            return "weights are float32, which npu_lightning_indexer does not take on 950 (casting would round)"
        if not valid_sparse_count(a["topk"]):
            return f"topk = {a['topk']}: sparse_count must be 1..2048 or 3072..8192 in steps of 1024"
        if k.shape[1] == 0:
            return "no keys (N = 0)"
        if a.get("candidates") is not None:
            return ("candidates (V4.1's candidate mask): npu_lightning_indexer has no mask argument (sparse_mode is "
                    "0 = none or 3 = causal only); ascend/torch applies it")
        if a.get("score_dtype") not in (None, q.dtype):
            return (f"score_dtype {a['score_dtype']}: npu_lightning_indexer scores {q.dtype} inputs in its own "
                    f"precision; only the default (scores in q's dtype) maps onto it")
        return None
    return supports


def make_indexer_topk(npu: Any) -> Callable[..., Tensor]:
    def indexer_topk(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int,
                     k_scale: Tensor | None = None, return_scores: bool = False,
                     score_dtype: torch.dtype | None = None, candidates: Tensor | None = None,
                     sorted_output: bool = False) -> Tensor:
        b = q.shape[0]
        lengths = visible[:, 0].to(torch.int32).contiguous()
        idx, _ = npu.npu_lightning_indexer(
            q.contiguous(), k.unsqueeze(2).contiguous(), weights.contiguous(), actual_seq_lengths_key=lengths,
            layout_query="BSND", layout_key="BSND", sparse_count=topk, sparse_mode=3)
        idx = idx.reshape(b, 1, topk).to(torch.int32)
        slots = torch.arange(topk, device=q.device, dtype=torch.int32)
        keep = slots[None, None, :] < lengths.clamp(max=topk)[:, None, None]
        idx = torch.where(keep, idx, torch.full_like(idx, -1))
        if sorted_output:   # ascending key, the -1 slots (as N, above every key) last
            idx = torch.where(keep, idx, k.shape[1]).sort(dim=-1).values
            idx = torch.where(keep, idx, torch.full_like(idx, -1))
        if not return_scores:
            return idx
        return idx, _scores(q, k, weights, idx, q.dtype if score_dtype is None else score_dtype)
    return indexer_topk


def _scores(q: Tensor, k: Tensor, weights: Tensor, idx: Tensor, sd: torch.dtype) -> Tensor:
    """Scores of the returned keys in the contract's ``score_dtype`` precision, recomputed from q, k and
    weights (the op's ``sparse_values`` have an undocumented dtype): ``sum_h w[h] * relu(q[h] . k[idx])``,
    -inf where idx is -1. O(B * topk * H * D)."""
    b, _, h, d = q.shape
    topk = idx.shape[-1]
    rows = torch.gather(k.float(), 1, idx.reshape(b, topk, 1).clamp(min=0).long().expand(b, topk, d))
    dots = round_float(torch.matmul(q[:, 0].float(), rows.transpose(1, 2)).relu_(), sd)   # [B, H, topk]
    terms = round_float(weights[:, 0].float().unsqueeze(2) * dots, sd)
    scores = round_float(terms.sum(dim=1, keepdim=True), sd)                             # [B, 1, topk]
    return scores.masked_fill(idx < 0, float("-inf"))


def register(registrar: Any, npu: Any, feat: Features, priority: int, device_type: str) -> None:
    if feat.has("npu_lightning_indexer"):
        registrar.implement("indexer_topk", "fused", make_indexer_topk(npu), priority=priority,
                            requires=("npu_lightning_indexer",), device_type=device_type,
                            supports=supports_indexer(feat))
