"""A KV cache pool: one ``KVCache`` of ``n_slots`` sequences sized from a memory budget, slots allocated
per sequence and freed when it finishes; each slot is handed out as a one-sequence ``KVCache`` view with
its own position, so sequences at independent positions share the pool's storage.

A freed slot needs no clearing: a new sequence starts at position 0, where the window indices of earlier
positions are -1, no compressed entry is visible yet and the compressor's first block takes no
``prev_kv`` (see attention.py / compressor.py), so nothing of the previous occupant is read.
"""
from __future__ import annotations

import copy
import numbers
import os

import torch

from .cache import CompressorState, KVCache, LayerCache

__all__ = ["KVPool", "slot_bytes", "device_memory"]


def slot_bytes(model, max_seq_len: int) -> int:
    """Bytes one sequence of up to ``max_seq_len`` tokens takes in the pool (what ``KVPool`` allocates)."""
    if model.cfg.is_v41:
        from .cache_v41 import KVCache41
        return KVCache41(model.cfg, 1, max_seq_len, model.dtype, "meta", mtp=bool(model.mtp),
                         quant=model.ops.quant).nbytes()
    return KVCache(model.cfg, 1, max_seq_len, model.dtype, "meta", mtp=bool(model.mtp)).nbytes()


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory ``device`` has in all (host RAM for ``cpu``, the GPU's for ``cuda``), or None where
    that is not known: no pool larger than it can be allocated."""
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):   # no sysconf names on this platform
            return None
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device.index if device.index is not None
                                                else torch.cuda.current_device()).total_memory
    return None


def _state_view(st: CompressorState | None, i: int) -> CompressorState | None:
    if st is None:
        return None
    v = copy.copy(st)
    for name in ("kv", "gate", "prev_kv", "prev_gate"):
        t = getattr(st, name)
        setattr(v, name, None if t is None else t[i:i + 1])
    return v


def _layer_view(lc: LayerCache, i: int) -> LayerCache:
    v = copy.copy(lc)
    v.kv = lc.kv[i:i + 1]
    v.index_keys = None if lc.index_keys is None else lc.index_keys[i:i + 1]
    v.comp, v.index_comp = _state_view(lc.comp, i), _state_view(lc.index_comp, i)
    return v


class KVPool:
    """``KVPool(model, budget_bytes, max_seq_len)``: as many slots as the budget holds (at least one is
    required); ``alloc()`` returns a fresh one-sequence cache view or None when the pool is full."""

    def __init__(self, model, budget_bytes: int, max_seq_len: int) -> None:
        per = slot_bytes(model, max_seq_len)
        self.n_slots = budget_bytes // per
        if self.n_slots < 1:
            raise ValueError(f"KV pool: a budget of {budget_bytes:,} bytes holds no sequence of "
                             f"{max_seq_len} tokens ({per:,} bytes each)")
        self.slot_bytes, self.max_seq_len = per, max_seq_len
        self.cache = model.new_cache(self.n_slots, max_seq_len)
        self._free = list(range(self.n_slots - 1, -1, -1))
        self._views: dict[int, KVCache] = {}

    @property
    def used(self) -> int:
        return self.n_slots - len(self._free)

    def alloc(self) -> tuple[int, KVCache] | None:
        if not self._free:
            return None
        i = self._free.pop()
        if hasattr(self.cache, "view"):      # the V4.1 cache makes its own slot views
            self._views[i] = self.cache.view(i)
            return i, self._views[i]
        view = copy.copy(self.cache)
        view.batch, view.pos = 1, 0
        view.layers = [_layer_view(lc, i) for lc in self.cache.layers]
        view.mtp_layers = [_layer_view(lc, i) for lc in self.cache.mtp_layers]
        self._views[i] = view
        return i, view

    def free(self, slot: int) -> None:
        """Return ``slot`` (an id ``alloc`` handed out) to the pool; a float or bool id is refused, as
        ``0.0`` or ``True`` would match slot 0 / 1 and go back into the free list as a non-int."""
        if isinstance(slot, bool) or not isinstance(slot, numbers.Integral):
            raise TypeError(f"KV pool: slot must be an int (an id alloc() returned), got {type(slot).__name__} {slot!r}")
        slot = int(slot)
        if slot not in self._views:
            raise ValueError(f"KV pool: slot {slot} is not allocated")
        del self._views[slot]
        self._free.append(slot)
