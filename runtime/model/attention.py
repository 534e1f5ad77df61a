"""The attention layer of every kind (spec 3, 4 and 9.1): SWA (window only), CSA (window + indexer top-k
over ratio-4 entries) and HCA (window + every complete ratio-128 entry), one softmax with a sink.

Query path: ``q = wq_b(q_norm(wq_a(x)))``, weightless per-head RMS, RoPE on the trailing dims. Shared-KV
path: ``kv = kv_norm(wkv(x))``, RoPE, FP8 simulation of the nope dims. After ``sparse_attention``: inverse
RoPE, grouped low-rank ``wo_a`` (BF16 einsum, as the reference) and ``wo_b`` (FP8).

KV source of one call (``p0`` = position of the chunk's first token, S tokens):

* one-token decode: the token is written to its ring slot first and the cache's persistent buffer
  ``[ring (W) | compressed entries]`` is attended as is (the reference decode layout);
* a chunk (prefill, or chunked prefill from any p0): ``[ring (W) | the chunk's S raw rows | compressed
  entries]``; window positions before p0 come from the ring, the others from the chunk; the ring is
  updated after the attention.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .cache import LayerCache
from .compressor import Compressor
from .config import CSA, HCA, SWA, ModelConfig
from .functional import fp8_sim_nope, head_rms_norm, rms_norm
from .indexer import Indexer
from .opcall import OpCaller
from .rope import RopeTable, apply_rope
from .weights import Loader

__all__ = ["Attention", "window_indices"]


def window_indices(positions: Tensor, p0: int, window: int, decode: bool) -> Tensor:
    """[S, W] int32 buffer indices of the window ``pos-W+1 .. pos`` of each query (-1 before 0): ring
    slot ``q % W`` for tokens before the chunk (all tokens in decode), ``W + q - p0`` for chunk rows."""
    q = positions[:, None] - (window - 1) + torch.arange(window, device=positions.device)[None, :]
    ring = torch.remainder(q, window)
    idx = ring if decode else torch.where(q < p0, ring, window + q - p0)
    return torch.where(q < 0, torch.full_like(q, -1), idx).to(torch.int32)


class Attention:
    """``<prefix>.{wq_a, q_norm, wq_b, wkv, kv_norm, wo_a, wo_b, attn_sink, compressor.*, indexer.*}``."""

    def __init__(self, cfg: ModelConfig, layer: int, ld: Loader, prefix: str) -> None:
        # tensor parallel (ld.par.tp > 1): this rank's query heads, their sinks and wo_a groups, the matching
        # wo_b columns (partial output, all-reduced); wq_a, wkv, the norms and the compressors are replicated
        self.par = ld.par if ld.par is not None and ld.par.tp > 1 else None
        tp = self.par.tp if self.par is not None else 1
        self.cfg, self.kind, self.ratio = cfg, cfg.kind(layer), cfg.ratio(layer)
        self.n_heads, self.head_dim, self.rd = cfg.n_heads // tp, cfg.head_dim, cfg.rope_head_dim
        self.window, self.eps, self.groups = cfg.window_size, cfg.norm_eps, cfg.o_groups // tp
        self.wq_a_wkv = ld.fp8(f"{prefix}.wq_a", f"{prefix}.wkv")
        self.q_norm = ld.f32(f"{prefix}.q_norm.weight")
        self.kv_norm = ld.f32(f"{prefix}.kv_norm.weight")
        self.wq_b = ld.fp8(f"{prefix}.wq_b", tp_dim=0)
        self.wo_a = ld.fp8_dequant(f"{prefix}.wo_a", tp_dim=0).view(self.groups, cfg.o_lora_rank, -1)
        self.wo_b = ld.fp8(f"{prefix}.wo_b", tp_dim=1)
        self.sink = ld.f32(f"{prefix}.attn_sink", tp_dim=0)
        self.scale = self.head_dim ** -0.5
        self.compressor = (Compressor(ld, f"{prefix}.compressor", self.ratio, self.head_dim, self.rd, self.eps,
                                      rotate=False) if self.kind != SWA else None)
        self.indexer = Indexer(cfg, ld, f"{prefix}.indexer", self.ratio) if self.kind == CSA else None

    def __call__(self, ops: OpCaller, x: Tensor, lc: LayerCache, p0: int, rope: RopeTable) -> Tensor:
        """x [B, S, dim] (after attn_norm) at positions p0..p0+S-1 -> [B, S, dim]; updates ``lc``."""
        b, s, dim = x.shape
        w, h, hd = self.window, self.n_heads, self.head_dim
        positions = torch.arange(p0, p0 + s, device=x.device)
        cos, sin = rope.at(positions)
        qr, kv = self.wq_a_wkv(ops, x.reshape(b * s, dim))
        qr = rms_norm(qr, self.q_norm, self.eps)
        q = self.wq_b(ops, qr).view(b, s, h, hd)
        q = apply_rope(head_rms_norm(q, self.eps, ops.precision), cos[:, None], sin[:, None])
        kv = apply_rope(rms_norm(kv, self.kv_norm, self.eps).view(b, s, hd), cos, sin)
        if ops.quant:
            kv = fp8_sim_nope(kv, self.rd)

        decode = s == 1
        n_comp = 0
        if self.compressor is not None:
            n_comp = self.compressor.update(ops, x, lc.comp, lc.kv, w, p0, rope)
        offset = w if decode else w + s
        idx = [window_indices(positions, p0, w, decode).unsqueeze(0).expand(b, s, w)]
        if self.kind == CSA:
            top = self.indexer(ops, x, qr.view(b, s, -1), lc, p0, rope, positions)
            idx.append(torch.where(top >= 0, top + offset, top))
        elif self.kind == HCA and n_comp:
            t = torch.arange(n_comp, device=x.device)
            visible = torch.div(positions + 1, self.ratio, rounding_mode="floor")
            comp = torch.where(t[None, :] < visible[:, None], t[None, :] + offset, -1).to(torch.int32)
            idx.append(comp.unsqueeze(0).expand(b, s, n_comp))
        idx_t = torch.cat(idx, dim=-1).contiguous()

        if decode:
            lc.kv[:, p0 % w] = kv[:, 0]
            src = lc.kv
        else:
            src = torch.cat([lc.kv[:, :w], kv, lc.kv[:, w:w + n_comp]], dim=1)
        o = ops.sparse_attention(q.contiguous(), src, idx_t, self.sink, self.scale)
        if not decode:
            keep = min(s, w)
            slots = torch.remainder(positions[-keep:], w)
            lc.kv[:, slots] = kv[:, -keep:]

        o = apply_rope(o, cos[:, None], sin[:, None], inverse=True)
        z = torch.einsum("bsgd,grd->bsgr", o.view(b, s, self.groups, -1), self.wo_a).reshape(b * s, -1)
        if self.par is None:
            return self.wo_b(ops, z).view(b, s, dim)
        # this rank's wo_b columns give a partial sum: fp32 out (same FP8 blocks of z), summed over the group
        return self.par.tp_sum(self.wo_b(ops, z.float())).to(x.dtype).view(b, s, dim)
