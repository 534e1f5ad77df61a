"""The lightning indexer of CSA layers (spec 2): FP4-simulated, Hadamard-rotated queries from the shared
query latent, keys from its own compressor, top-k by ``indexer_topk``."""
from __future__ import annotations

import torch
from torch import Tensor

from ..invariant import active, linear
from .cache import LayerCache
from .compressor import Compressor
from .config import ModelConfig
from .functional import fp4_sim, hadamard
from .opcall import OpCaller
from .ragged import RaggedLayer
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
        q = self._queries(ops, qr.reshape(b * s, -1), rope.span(p0, s, b)).view(b, s, self.n_heads, -1)
        n = self.compressor.update(ops, x, lc.index_comp, lc.index_keys, 0, p0, rope)
        w = self._weights(ops, x)
        visible = self._visible(positions).unsqueeze(0).expand(b, s).contiguous()
        return self._topk(ops, q, lc.index_keys[:, :self._bucket(n, lc)], w.contiguous(), visible)

    def ragged(self, ops: OpCaller, x: Tensor, qr: Tensor, rb: RaggedLayer, rope: RopeTable) -> Tensor:
        """A ragged step (see ragged.py): x [T, dim], qr [T, q_lora] -> idx [T, topk] int32 as ``__call__``;
        one ``indexer_topk`` call for all decode rows (one each in the batch-invariant mode), one per prefill
        chunk."""
        q = self._queries(ops, qr, rope.at(rb.positions))
        n = self.compressor.update_ragged(ops, x, rb, [lc.index_comp for lc in rb.caches],
                                          [lc.index_keys for lc in rb.caches], 0, rope)
        w = self._weights(ops, x)
        visible = self._visible(rb.positions)
        out = torch.full((x.shape[0], self.topk), -1, dtype=torch.int32, device=x.device)
        # batch-invariant: a decode row gets a call of its own, as a prefill chunk does (a shared call's key
        # count is the largest bucket of the batch, and a plain-torch indexer's sums depend on it)
        alone = rb.prefill + (rb.decode if active(x) else [])
        if rb.decode and not active(x):
            rows = rb.decode_rows
            bucket = max(self._bucket(n[i], rb.caches[i]) for i in rb.decode)
            keys = torch.cat([rb.caches[i].index_keys[:, :bucket] for i in rb.decode])
            top = self._topk(ops, q[rows].unsqueeze(1), keys, w[rows].unsqueeze(1).contiguous(),
                             visible[rows].unsqueeze(1).contiguous())
            out[rows] = top[:, 0]
        for i in alone:
            r, lc = rb.rows(i), rb.caches[i]
            keys = lc.index_keys[:, :self._bucket(n[i], lc)]
            out[r] = self._topk(ops, q[r].unsqueeze(0), keys, w[r].unsqueeze(0).contiguous(),
                                visible[r].unsqueeze(0).contiguous())[0]
        return out

    def _queries(self, ops: OpCaller, qr: Tensor, cos_sin: tuple[Tensor, Tensor]) -> Tensor:
        """qr [T, q_lora] -> rotated (and FP4-simulated) queries [T, H, d]."""
        q = self.wq_b(ops, qr).view(qr.shape[0], self.n_heads, self.head_dim)
        cos, sin = cos_sin
        q = hadamard(apply_rope(q, cos[:, None], sin[:, None]))
        return fp4_sim(q) if ops.quant else q

    def _weights(self, ops: OpCaller, x: Tensor) -> Tensor:
        if ops.precision == "release":   # the release scales the bf16 projection in bf16
            return (linear(x, self.weights_proj) * self.weight_scale).float()
        return linear(x, self.weights_proj).float() * self.weight_scale

    def _visible(self, positions: Tensor) -> Tensor:
        return torch.div(positions + 1, self.ratio, rounding_mode="floor").to(torch.int32)

    @staticmethod
    def _bucket(n: int, lc: LayerCache) -> int:
        # keys beyond n are masked by ``visible``; rounding the count up to a power of two keeps the call's
        # shape (and so its bound implementation) fixed for many decode steps
        return max(1, min(lc.index_keys.shape[1], max(64, 1 << max(n - 1, 0).bit_length())))

    def _topk(self, ops: OpCaller, q: Tensor, keys: Tensor, w: Tensor, visible: Tensor) -> Tensor:
        if self.par is not None:
            return self.par.indexer_topk(ops, q, keys, w, visible, self.topk)
        return ops.indexer_topk(q, keys, w, visible, self.topk)
