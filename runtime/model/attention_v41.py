"""The V4.1 attention layer (official ``Attention``; spec deepseek-v41.md b1-b5, c, j).

Query ``q = wq_b(q_norm(wq_a(x)))`` with RoPE and no per-head norm; window KV ``kv_norm(wkv(x))`` with RoPE,
stored FP8 with a UE8M0 scale per 32 over all dims. Compressed layers add the shared global cache: a kv
source compresses (ratio 2 or 1), hands the RoPE-free latent to its indexer (keys), rotates it at position
``j * ratio`` and stores it FP4 (E2M1, an E4M3 scale per 16); the layers after it read that cache. Index
sources select entries (sorted, -1 padded), the other compressed layers reuse the last selection. One
``sparse_attention`` call reads the FP8 window rows and the FP4 global entries together, with the sink.

Buffer of one call (``p0`` = first position, S tokens), as the V4 layer: a one-token decode writes its ring
slot first and attends the ring; a chunk attends ``[ring | the chunk's rows]`` and updates the ring after.
Compressed entries are indexed after that buffer (offset = its length).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..formats import pack_kv_fp4, pack_kv_fp8
from .attention import Attention, declare_window, window_indices
from .cache_v41 import LayerCache41
from .compressor_v41 import Compressor41
from .config import SWA, ModelConfig
from .functional import rms_norm
from .grouped import GroupedProjection
from .indexer_v41 import Indexer41, Shared41, _bucket
from .opcall import OpCaller
from .rope import RopeTable, apply_rope
from .weights import Loader

__all__ = ["Attention41"]


class Attention41(Attention):
    """``<prefix>.{wq_a, q_norm, wq_b, wkv, kv_norm, wo_a, wo_b, attn_sink, compressor.*, indexer.*}``; the
    output projection (inverse RoPE, grouped ``wo_a``, ``wo_b``) is the V4 layer's."""

    def __init__(self, cfg: ModelConfig, layer: int, ld: Loader, prefix: str) -> None:  # noqa: super not called
        self.par = ld.par if ld.par is not None and ld.par.tp > 1 else None
        tp = self.par.tp if self.par is not None else 1
        self.cfg, self.kind, self.ratio = cfg, cfg.kind(layer), cfg.ratio(layer)
        self.n_heads, self.head_dim = cfg.n_heads // tp, cfg.head_dim
        self.window, self.eps, self.groups = cfg.window_size, cfg.norm_eps, cfg.o_groups // tp
        self.wq_a_wkv = ld.fp8(f"{prefix}.wq_a", f"{prefix}.wkv")
        self.q_norm = ld.f32(f"{prefix}.q_norm.weight")
        self.kv_norm = ld.f32(f"{prefix}.kv_norm.weight")
        self.wq_b = ld.fp8(f"{prefix}.wq_b", tp_dim=0)
        fp8_wo_a = f"{prefix}.wo_a.scale" in (getattr(ld.source, "schema", None) or {})
        self.wo_a = (ld.grouped_fp8(f"{prefix}.wo_a", self.groups) if fp8_wo_a else
                     GroupedProjection.from_weight(ld.act(f"{prefix}.wo_a.weight", tp_dim=0), self.groups))
        self.wo_b = ld.fp8(f"{prefix}.wo_b", tp_dim=1)
        self.sink = ld.f32(f"{prefix}.attn_sink", tp_dim=0)
        self.scale = self.head_dim ** -0.5
        backbone = layer < cfg.n_layers
        self.compressor = (Compressor41(ld, f"{prefix}.compressor", self.ratio, self.eps)
                           if backbone and layer in cfg.kv_source_layers else None)
        self.indexer = (Indexer41(cfg, layer, ld, f"{prefix}.indexer")
                        if backbone and layer in cfg.index_source_layers else None)

    def __call__(self, ops: OpCaller, x: Tensor, lc: LayerCache41, p0: int, rope: RopeTable,  # type: ignore[override]
                 shared: Shared41) -> Tensor:
        """x [B, S, dim] (after attn_norm) at positions p0.. -> [B, S, dim]; updates ``lc`` and ``shared``."""
        b, s, dim = x.shape
        positions = torch.arange(p0, p0 + s, device=x.device)
        cos, sin = rope.at(positions.repeat(b))
        qr, kv = self.wq_a_wkv(ops, x.reshape(b * s, dim))
        qr = rms_norm(qr, self.q_norm, self.eps)
        q = self.wq_b(ops, qr).view(b * s, self.n_heads, self.head_dim)
        q = apply_rope(q, cos[:, None], sin[:, None])
        kv = apply_rope(rms_norm(kv, self.kv_norm, self.eps), cos, sin)
        top, n_comp = None, 0
        if self.kind != SWA:
            n_comp = (p0 + s) // self.ratio
            if self.compressor is not None:
                latent, first = self.compressor(ops, x, lc.comp, p0)
                self.indexer.add_keys(ops, latent, first, lc, rope)
                self._store(latent, first, lc, rope)
            if self.indexer is not None:
                shared.topk = self.indexer(ops, x, qr.view(b, s, -1), lc, positions, rope, shared)
            top = shared.topk
        o = self._attend41(ops, q.view(b, s, self.n_heads, -1), kv.view(b, s, -1), lc, p0, top, n_comp)
        return self._output(ops, o.reshape(b * s, self.n_heads, -1), cos, sin, x.dtype).view(b, s, dim)

    def _store(self, latent: Tensor, first: int, lc: LayerCache41, rope: RopeTable) -> None:
        """New entries: RoPE at position ``j * ratio``, then FP4 into the global cache (or as they are)."""
        n = latent.shape[1]
        if not n:
            return
        cos, sin = rope.at(torch.arange(first, first + n, device=latent.device) * self.ratio)
        e = apply_rope(latent, cos, sin)
        lc.glob[:, first:first + n] = pack_kv_fp4(e) if lc.quant else e

    def _attend41(self, ops: OpCaller, q: Tensor, kv: Tensor, lc: LayerCache41, p0: int, top: Tensor | None,
                  n_comp: int) -> Tensor:
        b, s = q.shape[:2]
        w = self.window
        decode = s == 1
        positions = torch.arange(p0, p0 + s, device=q.device)
        rows = pack_kv_fp8(kv) if lc.quant else kv
        if decode:
            lc.win[:, p0 % w] = rows[:, 0]
            src = lc.win
        else:
            src = torch.cat([lc.win, rows], dim=1)
        idx = [window_indices(positions, p0, w, decode).unsqueeze(0).expand(b, s, w)]
        if top is not None:
            idx.append(torch.where(top >= 0, top + src.shape[1], top))
        idx_t = declare_window(torch.cat(idx, dim=-1).contiguous(), p0, s, w)
        if lc.quant:
            glob = lc.glob[:, :_bucket(n_comp, lc.glob.shape[1])] if top is not None else None
            o = ops.sparse_attention_v41(q.contiguous(), src.contiguous(), idx_t, self.sink, self.scale, glob)
        else:
            full = torch.cat([src, lc.glob[:, :n_comp]], dim=1) if top is not None else src
            o = ops.sparse_attention(q.contiguous(), full, idx_t, self.sink, self.scale)
        if not decode:
            keep = min(s, w)
            lc.win[:, torch.remainder(positions[-keep:], w)] = rows[:, -keep:]
        return o
