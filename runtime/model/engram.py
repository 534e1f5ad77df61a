"""Engram in the V4.1 model (official ``Engram`` and ``NgramHashState``; spec deepseek-v41.md f1-f3).

Before an Engram layer's block: the n-gram windows of compressed token classes (the cache keeps every
sequence's class history), ``engram_hash`` -> ``(N-1) * H`` row ids per token, ``engram_lookup`` of the FP8
table rows (the table stays memory-mapped: only those rows are read), ``kv = wkv(rows)`` (FP8 GEMM) split
into one key per stream and a shared value, and the gate

``d_j = sum(h_j * w * key_j) * rsqrt(mean h_j^2 + eps) * rsqrt(mean key_j^2 + eps) * dim^-1/2``,
``g_j = sigmoid(sign(d_j) * sqrt(max(|d_j|, 1e-6)))``, ``X_j += g_j * value`` (fp32, ``w = q_weight * k_weight``).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from ..engram_tables import engram_tables, ngram_windows
from .config import ModelConfig
from .opcall import OpCaller
from .weights import Loader

__all__ = ["Engram", "token_classes"]

_CLAMP = 1e-6


def token_classes(cfg: ModelConfig, source: Any, device: torch.device) -> Tensor:
    """int64 [vocab_size]: the Engram class of every token id, from the checkpoint's ``tokenizer.json``, or the
    byte tokenizer of the synthetic presets; ids beyond the tokenizer's vocabulary take the pad id's class.
    CheckpointError when the class count is not the config's ``engram_compressed_vocab_size``."""
    from .engram_map import check_class_count, engram_token_map, write_byte_tokenizer_json

    root = getattr(source, "root", None)
    path = os.path.join(root, "tokenizer.json") if root else None
    if path is None or not os.path.isfile(path):
        if cfg.extra.get("tokenizer") != "bytes":
            from ..errors import CheckpointError
            raise CheckpointError(f"{root or cfg.name}: V4.1's Engram needs the model's tokenizer.json (its token "
                                  f"classes feed the n-gram hash), none found")
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            path = write_byte_tokenizer_json(tmp)
            table, count = engram_token_map(path)
    else:
        table, count = engram_token_map(path)
    check_class_count(count, cfg.engram_compressed_vocab_size, path if root else cfg.name)
    full = torch.full((cfg.vocab_size,), int(table[cfg.engram_pad_id]), dtype=torch.int64)
    n = min(cfg.vocab_size, table.shape[0])
    full[:n] = table[:n]
    return full.to(device)


class Engram:
    """``layers.L.engram.{embed.weight, embed.scale, wkv, q_weight, k_weight}`` of one Engram layer."""

    def __init__(self, cfg: ModelConfig, layer: int, ld: Loader, prefix: str) -> None:
        self.cfg, self.hc, self.dim, self.eps = cfg, cfg.hc_mult, cfg.dim, cfg.norm_eps
        self.n = cfg.engram_max_ngram_size
        t = engram_tables(cfg.engram_layer_ids, self.n, cfg.engram_n_heads, cfg.engram_vocab_size,
                          cfg.engram_compressed_vocab_size)[cfg.engram_layer_ids.index(layer)]
        self.tables = t.to(ld.device)
        self.par = ld.par if ld.par is not None and ld.par.tp > 1 else None
        self.table = ld.mapped(f"{prefix}.embed.weight")
        self.table_scale = ld.mapped(f"{prefix}.embed.scale")
        if self.par is not None:   # row-sharded over the TP group: this rank keeps rows [a, b) (views, no copy)
            self.part = self.par.tp_range(self.table.shape[0])
            self.table, self.table_scale = (t[self.part[0]:self.part[1]] for t in (self.table, self.table_scale))
            if ld.device.type != "cpu":
                # a rank's share (1/tp of ~100 GB per table) lives on its device, where the all-reduce runs
                self.table, self.table_scale = (t.to(ld.device) for t in (self.table, self.table_scale))
        self.wkv = ld.fp8(f"{prefix}.wkv")
        self.weight = ld.f32(f"{prefix}.q_weight") * ld.f32(f"{prefix}.k_weight")
        # the release dequantises the rows to bf16; an fp32 model keeps them exact
        self.out_dtype = torch.float32 if ld.dtype == torch.float32 else torch.bfloat16

    def __call__(self, ops: OpCaller, x: Tensor, hist: Tensor, p0: int, pad_class: int) -> Tensor:
        """Streams x [T, hc, dim] of B sequences x S tokens at positions p0.. (``hist`` [B, >= p0+S] their
        class history) -> x with the gated value added to every stream."""
        b = hist.shape[0]
        s = x.shape[0] // b
        win = ngram_windows(hist, p0, s, self.n).reshape(b * s, self.n).long()
        t = self.tables
        rows = ops.engram_hash(win.contiguous(), t.multipliers, t.primes, t.offsets, pad_class)
        e = self._lookup(ops, rows).reshape(b * s, -1)
        kv = self.wkv(ops, e).float()
        key = kv[:, :self.hc * self.dim].view(-1, self.hc, self.dim)
        value = kv[:, self.hc * self.dim:]
        h = x.float()
        rstd = torch.rsqrt(h.square().mean(-1) + self.eps) * torch.rsqrt(key.square().mean(-1) + self.eps)
        dot = (h * self.weight * key).sum(-1) * rstd * self.dim ** -0.5
        gate = torch.sigmoid(torch.copysign(dot.abs().clamp_min(_CLAMP).sqrt(), dot))
        return (h + gate.unsqueeze(-1) * value.unsqueeze(1)).to(x.dtype)

    def _lookup(self, ops: OpCaller, rows: Tensor) -> Tensor:
        """The rows, gathered where the table lies (a memory-mapped checkpoint table stays in host memory while
        the model runs on an accelerator: 24 rows per token cross, never the table), on the rows' device."""
        ids = rows.to(self.table.device)
        if self.par is not None:
            out = self.par.engram_lookup(ops, ids, self.table, self.table_scale, self.part, self.out_dtype)
        else:
            out = ops.engram_lookup(ids, self.table, self.table_scale, self.out_dtype)
        return out.to(rows.device)
