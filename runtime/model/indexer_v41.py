"""The V4.1 lightning indexer of an index source layer (official ``Indexer``; spec deepseek-v41.md c1-c4).

* Keys (key owners = kv source layers, when their compressor completes entries): ``k = k_norm(wk(latent))``
  from the RoPE-free compressor latent, RoPE on the last dims at position ``j * ratio``, MXFP4 (stored packed
  in the cache: 64 + 4 B per entry at d = 128). Every other index source reads its kv source's keys.
* Queries: ``q = wq_b(qr)`` (32 heads in the release), RoPE at the token position, MXFP4 fake-quant; no
  Hadamard. Head weights ``weights_proj(x) * d^-1/2 * H^-1/2``.
* Two levels: the candidate source scores every reachable entry (``indexer_scores``), keeps whole blocks
  (``select_candidate_blocks``), publishes the mask, and takes its own top-k over everything; the index
  sources after it take their top-k inside the mask (``indexer_topk(candidates=)``). Every top-k is sorted
  by position (``sorted_output``) and -1 padded; the attention adds its buffer offset.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..formats import quant_mxfp4
from ..invariant import linear
from .cache_v41 import LayerCache41
from .config import ModelConfig
from .functional import fp4_sim, rms_norm
from .opcall import OpCaller
from .rope import RopeTable, apply_rope
from .weights import Loader

__all__ = ["Indexer41", "Shared41"]


@dataclass
class Shared41:
    """What a forward hands down the stack (the release's ``shared_attn``): the last published top-k and the
    candidate mask of the candidate source."""

    topk: Tensor | None = None
    candidates: Tensor | None = None


class Indexer41:
    """``<prefix>.{wq_b, weights_proj}`` and, at a key owner, ``<prefix>.{wk, k_norm}``."""

    def __init__(self, cfg: ModelConfig, layer: int, ld: Loader, prefix: str) -> None:
        self.par = ld.par if ld.par is not None and ld.par.tp > 1 else None
        tp = self.par.tp if self.par is not None else 1
        self.n_heads, self.head_dim = cfg.index_n_heads // tp, cfg.index_head_dim
        self.topk, self.ratio, self.eps = cfg.index_topk, cfg.ratio(layer), cfg.norm_eps
        self.owns_k = layer in cfg.kv_source_layers
        self.is_candidate_source = layer == cfg.candidate_source_layer
        self.uses_candidates = 0 <= cfg.candidate_source_layer < layer
        self.blocks, self.block_size = cfg.candidate_topk_blocks, cfg.candidate_block_size
        self.wq_b = ld.fp8(f"{prefix}.wq_b", tp_dim=0)
        self.weights_proj = ld.act(f"{prefix}.weights_proj.weight", tp_dim=0)
        self.weight_scale = self.head_dim ** -0.5 * cfg.index_n_heads ** -0.5
        if self.owns_k:
            self.wk = ld.act(f"{prefix}.wk.weight")
            self.k_norm = ld.f32(f"{prefix}.k_norm.weight")

    def add_keys(self, ops: OpCaller, latent: Tensor, first: int, lc: LayerCache41, rope: RopeTable) -> None:
        """Index keys of the new compressor entries ``latent [B, n, D]`` (entries ``first..``) into the cache."""
        b, n, _ = latent.shape
        if not n:
            return
        k = rms_norm(linear(latent.reshape(b * n, -1), self.wk), self.k_norm, self.eps).view(b, n, -1)
        cos, sin = rope.at(torch.arange(first, first + n, device=k.device) * self.ratio)
        k = apply_rope(k, cos, sin)
        if lc.quant:
            codes, scale = quant_mxfp4(k.float())
            lc.ikeys[:, first:first + n] = codes
            lc.iscale[:, first:first + n] = scale
        else:
            lc.ikeys[:, first:first + n] = k

    def __call__(self, ops: OpCaller, x: Tensor, qr: Tensor, lc: LayerCache41, positions: Tensor, rope: RopeTable,
                 shared: Shared41) -> Tensor:
        """Queries x [B, S, dim] / qr [B, S, q_lora] at ``positions`` -> idx [B, S, topk] int32 (entry indices
        sorted by position, -1 padded); publishes the candidate mask at the candidate source."""
        b, s, _ = x.shape
        cos, sin = rope.at(positions.repeat(b))
        q = self.wq_b(ops, qr.reshape(b * s, -1)).view(b * s, self.n_heads, self.head_dim)
        q = apply_rope(q, cos[:, None], sin[:, None])
        q = (fp4_sim(q) if ops.quant else q).view(b, s, self.n_heads, self.head_dim)
        w = self._weights(ops, x.reshape(b * s, -1)).view(b, s, -1).contiguous()
        visible = torch.div(positions + 1, self.ratio, rounding_mode="floor").to(torch.int32)
        visible = visible.unsqueeze(0).expand(b, s).contiguous()
        n = _bucket(int(visible.max()), lc.ikeys.shape[1])
        keys = lc.ikeys[:, :n]
        kscale = lc.iscale[:, :n] if lc.iscale is not None else None
        cand = None
        if self.is_candidate_source:
            scores = self._scores(ops, q, keys, w, visible, kscale)
            shared.candidates = ops.select_candidate_blocks(scores, visible, self.block_size, self.blocks)
        elif self.uses_candidates:
            cand = shared.candidates
        return self._topk(ops, q, keys, w, visible, kscale, cand)

    def _weights(self, ops: OpCaller, x: Tensor) -> Tensor:
        if ops.precision == "release":   # the release scales the bf16 projection in bf16
            return (linear(x, self.weights_proj) * self.weight_scale).float()
        return linear(x, self.weights_proj).float() * self.weight_scale

    def _scores(self, ops: OpCaller, q: Tensor, keys: Tensor, w: Tensor, visible: Tensor,
                kscale: Tensor | None) -> Tensor:
        if self.par is not None:
            return self.par.indexer_scores(ops, q, keys, w, visible, kscale)
        return ops.indexer_scores(q, keys, w, visible, kscale)

    def _topk(self, ops: OpCaller, q: Tensor, keys: Tensor, w: Tensor, visible: Tensor, kscale: Tensor | None,
              cand: Tensor | None) -> Tensor:
        if self.par is not None:
            return self.par.indexer_topk_v41(ops, q, keys, w, visible, self.topk, kscale, cand)
        return ops.indexer_topk_v41(q, keys, w, visible, self.topk, kscale, cand)



def _bucket(n: int, cap: int) -> int:
    """Keys handed to the ops: ``n`` rounded up to a power of two (at least 64, at most the capacity), so a
    decode step's call keeps its shape, and its bound implementation, for many steps (``visible`` masks the
    rest)."""
    return max(1, min(cap, max(64, 1 << max(n - 1, 0).bit_length())))
