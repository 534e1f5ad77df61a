"""The KV compressor (spec 3.2, 4.1, 2.3): gated softmax pooling of ``ratio``-token blocks through the
``kv_compress`` op, then RMSNorm, RoPE at each block's first position, and the FP8 (main KV) or
Hadamard + FP4 (indexer keys) simulation.

Chunks of any length starting at any position are handled with the cache's CompressorState: the raw
rows of the incomplete block are prepended to the chunk, ``kv_compress`` runs on the complete blocks only
(its S % ratio == 0 contract), with the previous complete block as ``prev_kv``/``prev_gate`` when the
blocks overlap, and the leftover rows go back to the state. One-token decode is the same code: when a
token completes a block, ``kv_compress`` runs on exactly that block (plus the previous one).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..invariant import DenseWeight, active
from .cache import CompressorState
from .cores import native
from .functional import _native, fp4_sim, fp8_sim_nope, hadamard, rms_norm
from .opcall import OpCaller
from .ragged import RaggedLayer
from .rope import RopeTable, apply_rope
from .weights import Loader

__all__ = ["Compressor", "cat_kvg", "project_fp32"]


def cat_kvg(ld: Loader, prefix: str) -> Tensor:
    """``[wkv; wgate]`` of ``<prefix>``: bf16 when the source holds both as bf16 (what DenseWeight packs or
    widens, without a float32 temporary at load), else float32."""
    kv, gate = ld.stored(f"{prefix}.wkv.weight"), ld.stored(f"{prefix}.wgate.weight")   # read, copied by the cat
    if kv.dtype == gate.dtype == torch.bfloat16:
        return torch.cat([kv, gate]).to(ld.device)
    return torch.cat([kv.float(), gate.float()]).to(ld.device)


def project_fp32(w: DenseWeight, xf: Tensor) -> Tensor:
    """``w(xf)`` for float32 rows ``xf [T, K]``; in the batch-invariant mode on the CPU with the native
    kernel on every core (its sums never depend on the threads)."""
    if active(xf) and (w.packed is not None or _native("dense_gemm") is not None):
        return native(w, xf)
    return w(xf)


class Compressor:
    """``<prefix>.{wkv,wgate,ape,norm}``; ``rotate=True`` is the indexer's (Hadamard + FP4) flavour."""

    def __init__(self, ld: Loader, prefix: str, ratio: int, head_dim: int, rope_dim: int, eps: float,
                 rotate: bool) -> None:
        self.ratio, self.head_dim, self.rope_dim, self.eps, self.rotate = ratio, head_dim, rope_dim, eps, rotate
        self.overlap = ratio == 4
        # wkv and wgate run in fp32 (the reference upcasts them); one matmul for both, the weight kept in one
        # form: packed bf16 when built for the batch-invariant mode on the CPU, else float32 (see DenseWeight)
        self.w_kvg = DenseWeight(cat_kvg(ld, prefix))
        self.channels = self.w_kvg.shape[0] // 2
        self.ape = ld.f32(f"{prefix}.ape")
        self.norm = ld.f32(f"{prefix}.norm.weight")

    def update(self, ops: OpCaller, x: Tensor, st: CompressorState, out: Tensor, out_offset: int, p0: int,
               rope: RopeTable) -> int:
        """Feed the chunk ``x [B, S, dim]`` (positions ``p0..p0+S-1``); every block it completes becomes an
        entry written to ``out[:, out_offset + j]``. Returns the number of complete entries afterwards."""
        b, s, _ = x.shape
        return self.update_kvg(ops, self.project(x.reshape(b * s, -1)).view(b, s, -1), st, out, out_offset, p0, rope)

    def project(self, x: Tensor) -> Tensor:
        """Rows ``x [T, dim]`` -> fp32 ``[wkv(x) | wgate(x)]`` [T, 2C] (one matmul for a whole step). In the
        batch-invariant mode on the CPU the weight's bf16 values are read packed (the same bits, half the bytes
        of a float32 copy) on every core."""
        return project_fp32(self.w_kvg, x.float())

    def update_ragged(self, ops: OpCaller, x: Tensor, rb: RaggedLayer, states: list[CompressorState],
                      outs: list[Tensor], out_offset: int, rope: RopeTable) -> list[int]:
        """A ragged step (see ragged.py): rows ``x [T, dim]`` projected in one matmul, then each sequence's
        rows fed to its own state and entry buffer; the complete entries of each sequence afterwards."""
        kvg = self.project(x)
        return [self.update_kvg(ops, kvg[rb.rows(i)].unsqueeze(0), st, out, out_offset, rb.p0[i], rope)
                for i, (st, out) in enumerate(zip(states, outs))]

    def update_kvg(self, ops: OpCaller, kvg: Tensor, st: CompressorState, out: Tensor, out_offset: int, p0: int,
                   rope: RopeTable) -> int:
        """``update`` from the projected rows ``kvg [B, S, 2C]`` (see ``project``)."""
        r, c, s = self.ratio, self.channels, kvg.shape[1]
        kv, gate = kvg[..., :c], kvg[..., c:]
        r0 = p0 % r
        if r0 + s < r:      # no block completes (most decode steps): the rows only join the state
            st.kv[:, r0:r0 + s] = kv
            st.gate[:, r0:r0 + s] = gate
            return (p0 + s) // r
        if r0:
            kv = torch.cat([st.kv[:, :r0], kv], dim=1)
            gate = torch.cat([st.gate[:, :r0], gate], dim=1)
        first = (p0 - r0) // r          # index of the first block in kv / gate
        n = kv.shape[1] // r
        if n:
            full_kv, full_gate = kv[:, :n * r].contiguous(), gate[:, :n * r].contiguous()
            prev = (st.prev_kv, st.prev_gate) if self.overlap and first > 0 else (None, None)
            entries = ops.kv_compress(full_kv, full_gate, self.ape, r, self.overlap, *prev)
            if self.overlap:
                st.prev_kv.copy_(full_kv[:, (n - 1) * r:])
                st.prev_gate.copy_(full_gate[:, (n - 1) * r:])
            out[:, out_offset + first:out_offset + first + n] = self._finish(entries, first, rope, out.dtype, ops.quant)
        rest = kv.shape[1] - n * r
        if rest:
            st.kv[:, :rest] = kv[:, n * r:]
            st.gate[:, :rest] = gate[:, n * r:]
        return (p0 + s) // r

    def _finish(self, entries: Tensor, first: int, rope: RopeTable, dtype: torch.dtype, quant: bool) -> Tensor:
        """fp32 pooled entries -> cache dtype: RMSNorm, RoPE at position ratio * j, FP8 / FP4 simulation."""
        e = rms_norm(entries.to(dtype), self.norm, self.eps)
        pos = torch.arange(first, first + e.shape[1], device=e.device) * self.ratio
        cos, sin = rope.at(pos)
        e = apply_rope(e, cos, sin)
        if self.rotate:
            e = hadamard(e)
            return fp4_sim(e) if quant else e
        return fp8_sim_nope(e, self.rope_dim) if quant else e
