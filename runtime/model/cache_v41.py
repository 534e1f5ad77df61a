"""The DeepSeek-V4.1 KV cache, stored in the released formats (spec deepseek-v41.md 2.2(d)).

Per layer and sequence:

* the window ring ``win [B, W, D + D/32]`` uint8: FP8 E4M3 codes then one UE8M0 scale per 32 over all D dims
  (RoPE tail included), 528 B per token at D = 512 (:func:`dsv4rt.formats.pack_kv_fp8`);
* at a kv source layer only: the global compressed cache ``glob [B, cap, D/2 + D/16]`` uint8, E2M1 pairs then
  one E4M3 scale per 16 (288 B per entry, :func:`dsv4rt.formats.pack_kv_fp4`), the indexer keys in MXFP4
  (``ikeys [B, cap, d/2]`` + E8M0 ``iscale [B, cap, d/32]``: 68 B per entry at d = 128) and, for ratio 2, the
  compressor state (the raw fp32 rows of the incomplete block); ``cap = max_seq_len // ratio``;
* the layers after a source with the same ratio hold no compressed state: they read their source's
  (``LayerCache41.src``), as the release's ``shared_attn``.

Per sequence: the Engram history ``engram_hist [B, max_seq_len]`` int32 of compressed token classes.

``quant=False`` (the smooth model for exactness tests) keeps every buffer in the activation dtype instead.
"""
from __future__ import annotations

import torch
from torch import Tensor

import copy

from .cache import CompressorState
from .config import SWA, ModelConfig

__all__ = ["LayerCache41", "KVCache41", "kv_row_bytes"]


def kv_row_bytes(head_dim: int) -> tuple[int, int]:
    """(window bytes per token, global bytes per entry) of the packed formats: (D + D/32, D/2 + D/16)."""
    return head_dim + head_dim // 32, head_dim // 2 + head_dim // 16


class LayerCache41:
    """What one V4.1 layer keeps between calls (module docstring)."""

    def __init__(self, cfg: ModelConfig, layer: int, batch: int, max_seq_len: int, dtype: torch.dtype,
                 device: torch.device, quant: bool, src: "LayerCache41 | None") -> None:
        d, w = cfg.head_dim, cfg.window_size
        self.kind, self.ratio, self.window, self.quant = cfg.kind(layer), cfg.ratio(layer), w, quant
        self.owner = layer < cfg.n_layers and layer in cfg.kv_source_layers
        self.src = self if self.owner else src
        win_b, glob_b = kv_row_bytes(d)
        store = torch.uint8 if quant else dtype        # packed bytes, or the activation dtype (quant off)
        self.win = torch.zeros((batch, w, win_b if quant else d), dtype=store, device=device)
        self.capacity = max_seq_len // self.ratio if self.ratio else 0
        self._glob = self._ikeys = self._iscale = None
        self.comp: CompressorState | None = None
        if self.owner:
            ihd, cap = cfg.index_head_dim, self.capacity
            self._glob = torch.zeros((batch, cap, glob_b if quant else d), dtype=store, device=device)
            self._ikeys = torch.zeros((batch, cap, ihd // 2 if quant else ihd), dtype=store, device=device)
            self._iscale = torch.zeros((batch, cap, ihd // 32), dtype=store, device=device) if quant else None
            if self.ratio > 1:
                self.comp = CompressorState(batch, self.ratio, d, False, device)

    # the shared compressed state lives at the source layer
    @property
    def glob(self) -> Tensor:
        return self.src._glob

    @property
    def ikeys(self) -> Tensor:
        return self.src._ikeys

    @property
    def iscale(self) -> Tensor | None:
        return self.src._iscale

    def view(self, i: int, src: "LayerCache41 | None") -> "LayerCache41":
        """Sequence ``i`` of this layer as a one-sequence cache sharing the storage (``src``: the view of
        its kv source, for a reader)."""
        v = copy.copy(self)
        v.win = self.win[i:i + 1]
        if self.owner:
            v.src = v
            v._glob, v._ikeys = self._glob[i:i + 1], self._ikeys[i:i + 1]
            v._iscale = None if self._iscale is None else self._iscale[i:i + 1]
            if self.comp is not None:
                v.comp = copy.copy(self.comp)
                v.comp.kv, v.comp.gate = self.comp.kv[i:i + 1], self.comp.gate[i:i + 1]
        else:
            v.src = src
        return v

    def nbytes(self) -> int:
        """Bytes this layer owns (a reader's view of its source's cache counts at the source)."""
        own = [self.win] + ([self._glob, self._ikeys, self._iscale] if self.owner else [])
        n = sum(t.numel() * t.element_size() for t in own if t is not None)
        return n + (self.comp.nbytes() if self.comp is not None else 0)


class KVCache41:
    """The V4.1 cache of ``batch`` sequences advancing in lockstep, ``pos`` tokens each."""

    def __init__(self, cfg: ModelConfig, batch: int = 1, max_seq_len: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", mtp: bool = False,
                 quant: bool = True) -> None:
        self.cfg, self.batch, self.quant = cfg, batch, quant
        self.max_seq_len = max_seq_len or cfg.max_seq_len
        self.device = torch.device(device)
        self.pos = 0
        self.layers: list[LayerCache41] = []
        last: dict[int, LayerCache41] = {}
        for i in range(cfg.n_layers):
            lc = LayerCache41(cfg, i, batch, self.max_seq_len, dtype, self.device, quant, last.get(cfg.ratio(i)))
            if lc.owner:
                last[lc.ratio] = lc
            self.layers.append(lc)
        self.mtp_layers = [LayerCache41(cfg, cfg.n_layers + i, batch, self.max_seq_len, dtype, self.device, quant,
                                        None) for i in range(cfg.n_mtp_layers if mtp else 0)]
        self.engram_hist = torch.zeros((batch, self.max_seq_len), dtype=torch.int32, device=self.device)

    def view(self, i: int) -> "KVCache41":
        """Sequence ``i`` as a one-sequence cache at position 0 sharing this cache's storage (a KVPool slot)."""
        v = copy.copy(self)
        v.batch, v.pos = 1, 0
        v.layers, last = [], {}
        for lc in self.layers:
            lv = lc.view(i, last.get(lc.ratio))
            if lc.owner:
                last[lc.ratio] = lv
            v.layers.append(lv)
        v.mtp_layers = [lc.view(i, None) for lc in self.mtp_layers]
        v.engram_hist = self.engram_hist[i:i + 1]
        return v

    def check_room(self, tokens: int) -> None:
        if self.pos + tokens > self.max_seq_len:
            raise ValueError(f"KV cache: {self.pos} + {tokens} tokens exceed max_seq_len = {self.max_seq_len} "
                             f"(create the cache with a larger max_seq_len)")

    def nbytes(self) -> int:
        h = self.engram_hist
        return sum(lc.nbytes() for lc in self.layers + self.mtp_layers) + h.numel() * h.element_size()

    def kind_of(self, layer: int) -> str:
        return self.layers[layer].kind if layer < len(self.layers) else SWA
