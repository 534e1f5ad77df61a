"""The V4.1 KV compressor of a kv source layer (official ``Compressor``; spec deepseek-v41.md b1, b2).

* ratio 2: ``kv = wkv(x)``, ``score = wgate(x)`` in fp32 (both weights promoted to fp32), per channel a softmax
  over the 2 tokens of each group (no overlap, no position bias: ``kv_compress(..., ape=None, overlap=False)``),
  cast to the activation dtype, RMSNorm. The rows of an incomplete group wait in the cache's
  CompressorState, so chunks of any length starting anywhere give the same entries as the release.
* ratio 1: ``RMSNorm(wkv(x))`` with the BF16 ``wkv`` (no gate, nothing to pool: ``kv_compress`` with
  ``gate=None`` is the identity, kept so every compressed layer goes through the registry op).

The output is the RoPE-free latent of each new entry: the indexer derives its keys from it before the
attention rotates and quantises it into the global cache.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..invariant import DenseWeight, linear
from .cache import CompressorState
from .compressor import cat_kvg, project_fp32
from .functional import rms_norm
from .opcall import OpCaller
from .weights import Loader

__all__ = ["Compressor41"]


class Compressor41:
    """``<prefix>.{wkv, wgate (ratio 2), norm}``."""

    def __init__(self, ld: Loader, prefix: str, ratio: int, eps: float) -> None:
        self.ratio, self.eps = ratio, eps
        self.w: Tensor | None = None            # ratio 1: the bf16 wkv
        self.w_kvg: DenseWeight | None = None   # ratio > 1: wkv | wgate in fp32
        if ratio > 1:   # one fp32 matmul for both projections, as the release computes them in fp32; the weight
            # kept in one form: packed bf16 when built for the batch-invariant mode on the CPU (see DenseWeight)
            self.w_kvg = DenseWeight(cat_kvg(ld, prefix))
        else:
            self.w = ld.act(f"{prefix}.wkv.weight")
        self.norm = ld.f32(f"{prefix}.norm.weight")

    def __call__(self, ops: OpCaller, x: Tensor, st: CompressorState | None, p0: int) -> tuple[Tensor, int]:
        """Chunk ``x [B, S, dim]`` at positions ``p0..`` -> (latents [B, n, D] of the entries it completes, in
        x's dtype, pre-RoPE; the index of the first of them)."""
        b, s, _ = x.shape
        r = self.ratio
        if r == 1:
            kv = linear(x.reshape(b * s, -1), self.w).view(b, s, -1)
            e = ops.kv_compress(kv, None, None, 1, False, None, None)
            return rms_norm(e.to(x.dtype), self.norm, self.eps), p0
        c = self.w_kvg.shape[0] // 2
        kvg = project_fp32(self.w_kvg, x.reshape(b * s, -1).float()).view(b, s, -1)
        kv, gate = kvg[..., :c], kvg[..., c:]
        r0 = p0 % r
        if r0:
            kv = torch.cat([st.kv[:, :r0], kv], dim=1)
            gate = torch.cat([st.gate[:, :r0], gate], dim=1)
        first = (p0 - r0) // r
        n = kv.shape[1] // r
        rest = kv.shape[1] - n * r
        if rest:
            st.kv[:, :rest] = kv[:, n * r:]
            st.gate[:, :rest] = gate[:, n * r:]
        if not n:
            return x.new_zeros((b, 0, c)), first
        e = ops.kv_compress(kv[:, :n * r].contiguous(), gate[:, :n * r].contiguous(), None, r, False, None, None)
        return rms_norm(e.to(x.dtype), self.norm, self.eps), first
