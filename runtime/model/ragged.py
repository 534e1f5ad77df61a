"""A ragged step: sequences at independent positions in one forward (continuous batching).

Sequence i contributes ``s_i >= 1`` tokens (one decode token, or a prefill chunk) at positions
``p0_i .. p0_i + s_i - 1`` of its own one-sequence cache (a ``KVPool`` slot view). The token-wise parts of
the model (projections, norms, mHC, MoE) run on all ``T = sum s_i`` rows at once; the per-sequence state
(window ring, compressor blocks, compressed entries, indexer keys) stays per sequence:

* decode rows: one ``sparse_attention`` call for all of them over the slots' cache buffers seen as one flat
  buffer (no copy when the caches are views of one pool), and one ``indexer_topk`` call over their keys;
* prefill chunks: the chunk path of the lockstep model, one call per chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .cache import KVCache, LayerCache

__all__ = ["RaggedBatch", "RaggedLayer", "pool_rows"]


@dataclass
class RaggedLayer:
    """One layer's view of a ragged batch: the sequences' layer caches and their row ranges."""

    caches: list[LayerCache]
    p0: list[int]
    lens: list[int]
    starts: list[int]
    positions: Tensor              # [T] position of every row
    decode: list[int]              # sequences with one token this step
    prefill: list[int]             # sequences with a chunk of > 1 token
    decode_rows: Tensor            # [len(decode)] row of each decode sequence's token

    def rows(self, i: int) -> slice:
        return slice(self.starts[i], self.starts[i] + self.lens[i])


class RaggedBatch:
    """``RaggedBatch(tokens, caches, device)``: validates and lays out one step (see the module docstring)."""

    def __init__(self, tokens: list[Tensor], caches: list[KVCache], device: torch.device) -> None:
        if not tokens or len(tokens) != len(caches):
            raise ValueError(f"forward_ragged: {len(tokens)} token chunks for {len(caches)} caches "
                             f"(need n >= 1 of each, one per sequence)")
        lens = []
        for i, (t, c) in enumerate(zip(tokens, caches)):
            if t.dim() != 1 or t.numel() < 1:
                raise ValueError(f"forward_ragged: tokens[{i}] must be 1-D with >= 1 token, got shape {tuple(t.shape)}")
            if c.batch != 1:
                raise ValueError(f"forward_ragged: caches[{i}] holds {c.batch} sequences, expected a one-sequence "
                                 f"cache (a KVPool slot)")
            c.check_room(t.numel())
            lens.append(int(t.numel()))
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("forward_ragged: the same cache appears twice in one step")
        self.caches, self.lens = caches, lens
        self.p0 = [c.pos for c in caches]
        self.starts = [sum(lens[:i]) for i in range(len(lens))]
        self.ids = torch.cat([t.reshape(-1) for t in tokens]).to(device=device, dtype=torch.long)
        self.positions = torch.cat([torch.arange(p, p + s) for p, s in zip(self.p0, lens)]).to(device)
        self.last = torch.tensor([a + s - 1 for a, s in zip(self.starts, lens)], device=device)
        self.decode = [i for i, s in enumerate(lens) if s == 1]
        self.prefill = [i for i, s in enumerate(lens) if s > 1]
        self.decode_rows = torch.tensor([self.starts[i] for i in self.decode], dtype=torch.long, device=device)

    def layer(self, i: int, mtp: bool = False) -> RaggedLayer:
        return RaggedLayer([(c.mtp_layers if mtp else c.layers)[i] for c in self.caches], self.p0, self.lens,
                           self.starts, self.positions, self.decode, self.prefill, self.decode_rows)

    def advance(self) -> None:
        for c, s in zip(self.caches, self.lens):
            c.pos += s


def pool_rows(tensors: list[Tensor]) -> tuple[Tensor, list[int]] | None:
    """``[1, N, d]`` slot views of one contiguous pool tensor -> (the pool as one ``[1, R, d]`` buffer, the
    row offset of each view in it), no copy; None when they are not views of one pool."""
    base = tensors[0]._base
    if (base is None or base.dim() != 3 or not base.is_contiguous()
            or not all(t._base is base and t.shape[1:] == base.shape[1:] for t in tensors)):
        return None
    rows = base.shape[1]
    return base.view(1, -1, base.shape[2]), [
        (t.storage_offset() - base.storage_offset()) // base.stride(0) * rows for t in tensors]
