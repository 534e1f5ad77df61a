"""The lightning indexer of CSA layers (spec 2): FP4-simulated, Hadamard-rotated queries from the shared
query latent, keys from its own compressor, top-k by ``indexer_topk``."""
from __future__ import annotations

import torch
from torch import Tensor

from .cache import LayerCache
from .compressor import Compressor
from .config import ModelConfig
from .functional import fp4_sim, hadamard
from .opcall import OpCaller
from .rope import RopeTable, apply_rope
from .weights import Loader

__all__ = ["Indexer"]


class Indexer:
    """``<prefix>.{wq_b, weights_proj, compressor.*}``."""

    def __init__(self, cfg: ModelConfig, ld: Loader, prefix: str, ratio: int) -> None:
        # tensor parallel: this rank's heads (wq_b rows, weights_proj rows); the compressor is replicated and
        # the per-head scores are summed over the group before the top-k (par.indexer_topk)
        self.par = ld.par if ld.par is not None and ld.par.tp > 1 else None
        tp = self.par.tp if self.par is not None else 1
        self.n_heads, self.head_dim = cfg.index_n_heads // tp, cfg.index_head_dim
        self.topk, self.ratio = cfg.index_topk, ratio
        self.wq_b = ld.fp8(f"{prefix}.wq_b", tp_dim=0)
        self.weights_proj = ld.act(f"{prefix}.weights_proj.weight", tp_dim=0)
        self.weight_scale = self.head_dim ** -0.5 * cfg.index_n_heads ** -0.5
        self.compressor = Compressor(ld, f"{prefix}.compressor", ratio, self.head_dim, cfg.rope_head_dim,
                                     cfg.norm_eps, rotate=True)

    def __call__(self, ops: OpCaller, x: Tensor, qr: Tensor, lc: LayerCache, p0: int, rope: RopeTable,
                 positions: Tensor) -> Tensor:
        """idx [B, S, topk] int32: compressed-entry indices (no offset) or -1, for queries at ``positions``."""
        b, s, _ = x.shape
        q = self.wq_b(ops, qr.reshape(b * s, -1)).view(b, s, self.n_heads, self.head_dim)
        cos, sin = rope.at(positions)
        q = hadamard(apply_rope(q, cos[:, None], sin[:, None]))
        if ops.quant:
            q = fp4_sim(q)
        n = self.compressor.update(ops, x, lc.index_comp, lc.index_keys, 0, p0, rope)
        if ops.precision == "release":   # the release scales the bf16 projection in bf16
            w = ((x @ self.weights_proj.T) * self.weight_scale).float()
        else:
            w = (x @ self.weights_proj.T).float() * self.weight_scale
        visible = torch.div(positions + 1, self.ratio, rounding_mode="floor").to(torch.int32)
        visible = visible.unsqueeze(0).expand(b, s).contiguous()
        # keys beyond n are masked by ``visible``; rounding the count up to a power of two keeps the call's
        # shape (and so its bound implementation) fixed for many decode steps
        bucket = min(lc.index_keys.shape[1], max(64, 1 << max(n - 1, 0).bit_length()))
        keys = lc.index_keys[:, :max(bucket, 1)]
        if self.par is not None:
            return self.par.indexer_topk(ops, q, keys, w.contiguous(), visible, self.topk)
        return ops.indexer_topk(q, keys, w.contiguous(), visible, self.topk)
