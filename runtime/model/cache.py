"""The KV cache: per layer and per sequence of a batch (sequences advance in lockstep, ``pos`` tokens).

Per layer (spec 8.1):

* ``kv [B, W + cap, head_dim]`` in the activation dtype: slots ``[0, W)`` are the ring window (token p
  lives in slot ``p % W``), slots ``W + j`` hold compressed entry j (``cap = max_seq_len // ratio``).
  This is the buffer one-token decode hands to ``sparse_attention`` as is (the reference layout).
* compressor state (CSA / HCA): the raw fp32 ``wkv(x)`` / ``wgate(x)`` rows of the incomplete block
  (``pos % ratio`` of them) and, with overlap (ratio 4), the previous complete block, which
  ``kv_compress`` takes as ``prev_kv`` / ``prev_gate``.
* CSA only: the indexer keys ``[B, cap, index_head_dim]`` and the indexer compressor's state.
"""
from __future__ import annotations

import torch

from .config import CSA, SWA, ModelConfig

__all__ = ["CompressorState", "LayerCache", "KVCache"]


class CompressorState:
    """Raw fp32 rows of the incomplete block (``kv``, ``gate``: [B, ratio, C]) and, with overlap, the last
    complete block (``prev_kv``, ``prev_gate``)."""

    def __init__(self, batch: int, ratio: int, channels: int, overlap: bool, device: torch.device) -> None:
        shape = (batch, ratio, channels)
        self.ratio, self.overlap = ratio, overlap
        self.kv = torch.zeros(shape, dtype=torch.float32, device=device)
        self.gate = torch.zeros(shape, dtype=torch.float32, device=device)
        self.prev_kv = torch.zeros(shape, dtype=torch.float32, device=device) if overlap else None
        self.prev_gate = torch.zeros(shape, dtype=torch.float32, device=device) if overlap else None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kv, self.gate, self.prev_kv, self.prev_gate)
                   if t is not None)


class LayerCache:
    """Everything one attention layer keeps between calls (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, layer: int, batch: int, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.kind, self.ratio, self.window = cfg.kind(layer), cfg.ratio(layer), cfg.window_size
        self.capacity = max_seq_len // self.ratio if self.ratio else 0
        self.kv = torch.zeros((batch, self.window + self.capacity, cfg.head_dim), dtype=dtype, device=device)
        self.comp: CompressorState | None = None
        self.index_keys: torch.Tensor | None = None
        self.index_comp: CompressorState | None = None
        if self.kind != SWA:
            overlap = self.ratio == 4
            self.comp = CompressorState(batch, self.ratio, (2 if overlap else 1) * cfg.head_dim, overlap, device)
        if self.kind == CSA:
            self.index_keys = torch.zeros((batch, self.capacity, cfg.index_head_dim), dtype=dtype, device=device)
            self.index_comp = CompressorState(batch, self.ratio, 2 * cfg.index_head_dim, True, device)

    def nbytes(self) -> int:
        n = self.kv.numel() * self.kv.element_size()
        if self.index_keys is not None:
            n += self.index_keys.numel() * self.index_keys.element_size()
        for st in (self.comp, self.index_comp):
            if st is not None:
                n += st.nbytes()
        return n


class KVCache:
    """The cache of a batch of ``batch`` sequences, ``pos`` tokens each, up to ``max_seq_len`` tokens."""

    def __init__(self, cfg: ModelConfig, batch: int = 1, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", mtp: bool = False) -> None:
        self.cfg, self.batch = cfg, batch
        self.max_seq_len = max_seq_len or cfg.max_seq_len
        self.device = torch.device(device)
        self.pos = 0
        self.layers = [LayerCache(cfg, i, batch, self.max_seq_len, dtype, self.device) for i in range(cfg.n_layers)]
        self.mtp_layers = [LayerCache(cfg, cfg.n_layers + i, batch, self.max_seq_len, dtype, self.device)
                           for i in range(cfg.n_mtp_layers if mtp else 0)]

    def check_room(self, tokens: int) -> None:
        if self.pos + tokens > self.max_seq_len:
            raise ValueError(f"KV cache: {self.pos} + {tokens} tokens exceed max_seq_len = {self.max_seq_len} "
                             f"(create the cache with a larger max_seq_len)")

    def nbytes(self) -> int:
        return sum(lc.nbytes() for lc in self.layers + self.mtp_layers)
