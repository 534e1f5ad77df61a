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

from ..invariant import active
from ..ops.attention import WindowedIndex
from .cache import LayerCache
from .compressor import Compressor
from .config import CSA, HCA, SWA, ModelConfig
from .functional import fp8_sim_nope, head_rms_norm, rms_norm
from .indexer import Indexer
from .opcall import OpCaller
from .ragged import RaggedLayer, pool_rows
from .rope import RopeTable, apply_rope
from .weights import Loader

__all__ = ["Attention", "window_indices", "decode_window", "declare_window"]


def window_indices(positions: Tensor, p0: int, window: int, decode: bool) -> Tensor:
    """[S, W] int32 buffer indices of the window ``pos-W+1 .. pos`` of each query (-1 before 0): ring
    slot ``q % W`` for tokens before the chunk (all tokens in decode), ``W + q - p0`` for chunk rows."""
    q = positions[:, None] - (window - 1) + torch.arange(window, device=positions.device)[None, :]
    ring = torch.remainder(q, window)
    idx = ring if decode else torch.where(q < p0, ring, window + q - p0)
    return torch.where(q < 0, torch.full_like(q, -1), idx).to(torch.int32)


_DECODE_WINDOWS: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}


def decode_window(p0: int, window: int, device: torch.device) -> Tensor:
    """``window_indices(arange(p0, p0 + 1), p0, window, decode=True)`` ([1, W] int32) as a slice of two tables
    kept per window and device (``[-1] * (W - 1) + [0 .. W-1]`` and ``[0 .. W-1] * 2``) instead of ~8 torch
    steps per layer of a decode step. A read-only view: callers copy it (``torch.cat``) before any write."""
    key = (window, torch.device(device))
    tables = _DECODE_WINDOWS.get(key)
    if tables is None:
        ramp = torch.arange(window, dtype=torch.int32, device=device)
        tables = _DECODE_WINDOWS[key] = (torch.cat([torch.full((window - 1,), -1, dtype=torch.int32, device=device),
                                                    ramp]), torch.cat([ramp, ramp]))
    start, table = (p0, tables[0]) if p0 < window - 1 else ((p0 + 1) % window, tables[1])
    return table[start:start + window].unsqueeze(0)


def declare_window(idx: Tensor, p0: int, s: int, window: int) -> Tensor:
    """``idx`` [B, S, K] of a lockstep call whose leading ``window`` columns are :func:`window_indices`, declared
    as such (:class:`dsv4rt.ops.attention.WindowedIndex`, which backends without a use for it read as the
    plain idx) where the window is rows a backend can take without reading idx: one-token decode (the ring
    buffer's first ``min(p0 + 1, W)`` rows) and a chunk from position 0 (a causal band over its own rows at
    ``W ..``). A chunk from ``p0 > 0`` takes its earlier window rows from the ring: left undeclared."""
    if s == 1:
        return WindowedIndex.decode(idx, window, 0, [min(p0 + 1, window)] * idx.shape[0])
    return WindowedIndex.prefill(idx, window, window) if p0 == 0 else idx


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
        self.wo_a = ld.grouped_fp8(f"{prefix}.wo_a", self.groups)
        self.wo_b = ld.fp8(f"{prefix}.wo_b", tp_dim=1)
        self.sink = ld.f32(f"{prefix}.attn_sink", tp_dim=0)
        self.scale = self.head_dim ** -0.5
        self.compressor = (Compressor(ld, f"{prefix}.compressor", self.ratio, self.head_dim, self.rd, self.eps,
                                      rotate=False) if self.kind != SWA else None)
        self.indexer = Indexer(cfg, ld, f"{prefix}.indexer", self.ratio) if self.kind == CSA else None

    def __call__(self, ops: OpCaller, x: Tensor, lc: LayerCache, p0: int, rope: RopeTable) -> Tensor:
        """x [B, S, dim] (after attn_norm) at positions p0..p0+S-1 -> [B, S, dim]; updates ``lc``."""
        b, s, dim = x.shape
        positions = torch.arange(p0, p0 + s, device=x.device)
        cos, sin = rope.span(p0, s, b)
        q, qr, kv = self._project(ops, x.reshape(b * s, dim), cos, sin)
        n_comp = self.compressor.update(ops, x, lc.comp, lc.kv, self.window, p0, rope) if self.compressor else 0
        top = self.indexer(ops, x, qr.view(b, s, -1), lc, p0, rope, positions) if self.kind == CSA else None
        o = self._attend(ops, q.view(b, s, self.n_heads, -1), kv.view(b, s, -1), lc, p0, top, n_comp)
        return self._output(ops, o.reshape(b * s, self.n_heads, -1), cos, sin, x.dtype).view(b, s, dim)

    def ragged(self, ops: OpCaller, x: Tensor, rb: RaggedLayer, rope: RopeTable) -> Tensor:
        """A ragged step (see ragged.py): x [T, dim] of sequences at their own positions -> [T, dim]."""
        cos, sin = rope.at(rb.positions)
        q, qr, kv = self._project(ops, x, cos, sin)
        n_comp = [0] * len(rb.caches)
        if self.compressor is not None:
            n_comp = self.compressor.update_ragged(ops, x, rb, [lc.comp for lc in rb.caches],
                                                   [lc.kv for lc in rb.caches], self.window, rope)
        top = self.indexer.ragged(ops, x, qr, rb, rope) if self.kind == CSA else None
        o = torch.empty_like(q)
        if rb.decode:
            o[rb.decode_rows] = self._attend_decode_rows(ops, q, kv, rb, top, n_comp)
        for i in rb.prefill:
            r = rb.rows(i)
            o[r] = self._attend(ops, q[r].unsqueeze(0), kv[r].unsqueeze(0), rb.caches[i], rb.p0[i],
                                None if top is None else top[r].unsqueeze(0), n_comp[i])[0]
        return self._output(ops, o, cos, sin, x.dtype)

    def _project(self, ops: OpCaller, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rows x [T, dim] -> (q [T, H, D] normed and rotated, query latent qr [T, q_lora], kv [T, D])."""
        qr, kv = self.wq_a_wkv(ops, x)
        qr = rms_norm(qr, self.q_norm, self.eps)
        q = self.wq_b(ops, qr).view(x.shape[0], self.n_heads, self.head_dim)
        q = apply_rope(head_rms_norm(q, self.eps, ops.precision), cos[:, None], sin[:, None])
        kv = apply_rope(rms_norm(kv, self.kv_norm, self.eps), cos, sin)
        return q, qr, (fp8_sim_nope(kv, self.rd) if ops.quant else kv)

    def _attend(self, ops: OpCaller, q: Tensor, kv: Tensor, lc: LayerCache, p0: int, top: Tensor | None,
                n_comp: int) -> Tensor:
        """Lockstep attention of q [B, S, H, D] at positions p0.. over the cache (module docstring)."""
        b, s = q.shape[:2]
        w = self.window
        decode = s == 1
        positions = torch.arange(p0, p0 + s, device=q.device)
        offset = w if decode else w + s
        win = decode_window(p0, w, q.device) if decode else window_indices(positions, p0, w, decode)
        idx = [win.unsqueeze(0).expand(b, s, w)]
        if top is not None:
            idx.append(torch.where(top >= 0, top + offset, top))
        elif self.kind == HCA and n_comp and decode:   # entries t < (p0 + 1) // ratio visible
            comp = torch.arange(offset, offset + n_comp, dtype=torch.int32, device=q.device)
            comp[(p0 + 1) // self.ratio:] = -1
            idx.append(comp.expand(b, s, n_comp))
        elif self.kind == HCA and n_comp:
            t = torch.arange(n_comp, device=q.device)
            visible = torch.div(positions + 1, self.ratio, rounding_mode="floor")
            comp = torch.where(t[None, :] < visible[:, None], t[None, :] + offset, -1).to(torch.int32)
            idx.append(comp.unsqueeze(0).expand(b, s, n_comp))
        idx_t = declare_window(torch.cat(idx, dim=-1).contiguous(), p0, s, w)
        if decode:
            lc.kv[:, p0 % w] = kv[:, 0]
            src = lc.kv
        else:
            src = torch.cat([lc.kv[:, :w], kv, lc.kv[:, w:w + n_comp]], dim=1)
        o = ops.sparse_attention(q.contiguous(), src, idx_t, self.sink, self.scale)
        if not decode:
            keep = min(s, w)
            lc.kv[:, torch.remainder(positions[-keep:], w)] = kv[:, -keep:]
        return o

    def _attend_decode_rows(self, ops: OpCaller, q: Tensor, kv: Tensor, rb: RaggedLayer, top: Tensor | None,
                            n_comp: list[int]) -> Tensor:
        """The decode rows of a ragged step, one ``sparse_attention`` call over their caches' buffers seen as
        one flat buffer (sequence j's rows at ``offs[j]``) -> o [n_decode, H, D]."""
        w, rows = self.window, rb.decode_rows
        seqs = rb.decode
        bufs = [rb.caches[i].kv for i in seqs]
        pos = rb.positions[rows]
        ring = torch.remainder(pos, w)
        pooled = pool_rows(bufs)
        if pooled is not None:          # slot views of one pool: write the rings through the flat view
            flat, offs = pooled
            off = torch.tensor(offs, dtype=torch.long, device=q.device)
            flat[0].index_copy_(0, off + ring, kv[rows])
        else:                           # separate caches: write each ring, then concatenate
            for j, buf in enumerate(bufs):
                buf[0, int(ring[j])] = kv[rows[j]]
            flat = torch.cat(bufs, dim=1)
            off = torch.tensor([0] + [b.shape[1] for b in bufs[:-1]], device=q.device).cumsum(0)
        if flat.shape[1] >= 2 ** 31:
            raise ValueError(f"forward_ragged: {flat.shape[1]:,} cache rows exceed int32 indexing; use fewer or "
                             f"shorter slots")
        off = off[:, None]
        win = window_indices(pos, 0, w, decode=True).long()
        idx = [torch.where(win >= 0, win + off, -1)]
        if top is not None:
            t = top[rows].long()
            idx.append(torch.where(t >= 0, t + off + w, -1))
        elif self.kind == HCA:
            # the widest sequence sets the index width; batch-invariant: the caches' capacity instead, so a
            # row's call has the same shape alone and in any batch (a plain-torch or NumPy softmax sums
            # over the whole width, -1 entries included)
            m = (max(rb.caches[i].kv.shape[1] - w for i in seqs) if active(q) else max(n_comp[i] for i in seqs))
            if m:
                t = torch.arange(m, device=q.device)[None, :]
                visible = torch.div(pos + 1, self.ratio, rounding_mode="floor")[:, None]
                idx.append(torch.where(t < visible, t + off + w, -1))
        idx_t = torch.cat(idx, dim=-1).to(torch.int32).unsqueeze(0).contiguous()
        return ops.sparse_attention(q[rows].unsqueeze(0).contiguous(), flat, idx_t, self.sink, self.scale)[0]

    def _output(self, ops: OpCaller, o: Tensor, cos: Tensor, sin: Tensor, dtype: torch.dtype) -> Tensor:
        """o [T, H, D] -> inverse RoPE, grouped low-rank ``wo_a`` (bf16, as the reference; grouped.py), ``wo_b``."""
        t = o.shape[0]
        o = apply_rope(o, cos[:, None], sin[:, None], inverse=True).view(t, self.groups, -1)
        z = self.wo_a(o)
        if self.par is None:
            return self.wo_b(ops, z)
        # this rank's wo_b columns give a partial sum: fp32 out (same FP8 blocks of z), summed over the group
        return self.par.tp_sum(self.wo_b(ops, z.float())).to(dtype)
