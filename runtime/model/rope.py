"""Rotary embeddings of V4 (spec 9.3): interleaved pairs (2i, 2i+1) on the trailing ``rope_head_dim``
dims; compressed layers use ``compress_rope_theta`` with YaRN (no mscale), SWA layers and MTP the plain
``rope_theta`` table. The tables are built exactly as the reference ``precompute_freqs_cis`` (float32)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import SWA, ModelConfig
from .functional import _NATIVE_DTYPES, _bits, _native

__all__ = ["RopeTable", "rope_tables", "apply_rope"]


def _inv_freqs(dim: int, base: float, original_seq_len: int, factor: float, beta_fast: int,
               beta_slow: int) -> Tensor:
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if original_seq_len > 0:
        def corr(rot: float) -> float:
            return dim * math.log(original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))
        low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    return freqs


class RopeTable:
    """cos / sin ``[max_seq_len, rope_dim / 2]`` float32 for one layer kind."""

    def __init__(self, rope_dim: int, max_seq_len: int, base: float, original_seq_len: int = 0,
                 factor: float = 1.0, beta_fast: int = 32, beta_slow: int = 1, device: str | torch.device = "cpu"):
        freqs = _inv_freqs(rope_dim, base, original_seq_len, factor, beta_fast, beta_slow)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
        self.rope_dim = rope_dim
        self.cos = torch.cos(angles).to(device)
        self.sin = torch.sin(angles).to(device)
        self._span: tuple = (None, None, None)     # (key, cos, sin) of the last span()

    def at(self, positions: Tensor | slice) -> tuple[Tensor, Tensor]:
        return self.cos[positions], self.sin[positions]

    def span(self, p0: int, s: int, batch: int) -> tuple[Tensor, Tensor]:
        """``at(positions.repeat(batch))`` for positions ``p0 .. p0+s-1``: the rows of a lockstep step, taken
        once per step and shared by its layers (the last step's rows are kept, as one tuple swapped whole;
        callers never write them)."""
        memo = self._span
        if memo[0] != (p0, s, batch):
            if p0 < 0 or p0 + s > self.cos.shape[0]:
                raise IndexError(f"RoPE table: positions {p0}..{p0 + s - 1} beyond its {self.cos.shape[0]} rows")
            cos, sin = self.cos[p0:p0 + s], self.sin[p0:p0 + s]
            if batch != 1:
                cos, sin = cos.repeat(batch, 1), sin.repeat(batch, 1)
            memo = self._span = ((p0, s, batch), cos, sin)
        return memo[1], memo[2]


def rope_tables(cfg: ModelConfig, device: str | torch.device, max_seq_len: int | None = None) -> dict[str, RopeTable]:
    """``{"swa": plain table, "compressed": YaRN table}`` for every layer of ``cfg``."""
    n = max_seq_len or cfg.max_seq_len
    return {SWA: RopeTable(cfg.rope_head_dim, n, cfg.rope_theta, device=device),
            "compressed": RopeTable(cfg.rope_head_dim, n, cfg.compress_rope_theta, cfg.original_seq_len,
                                    cfg.rope_factor, cfg.beta_fast, cfg.beta_slow, device=device)}


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Rotate the trailing ``2 * cos.shape[-1]`` dims of x by interleaved pairs; ``cos``/``sin`` broadcast
    against ``x[..., :rd/2]`` (e.g. ``[S, 1, rd/2]`` for ``x [B, S, H, D]``). ``inverse`` rotates by the
    negative angle (the output de-rotation). Float32 math, x's dtype out, a new tensor. On the CPU, where each
    cos row serves consecutive rows of x, one native call (``_C.rope_rows``) gives the same bits."""
    rep = _native_rep(x, cos, sin)
    if rep:
        d = x.shape[-1]
        out = torch.empty(x.shape, dtype=x.dtype)
        _native("rope_rows")(_bits(x.contiguous().view(-1, d)), cos.contiguous().view(-1, cos.shape[-1]).numpy(),
                             sin.contiguous().view(-1, sin.shape[-1]).numpy(), _bits(out.view(-1, d)), rep, inverse)
        return out
    rd = 2 * cos.shape[-1]
    xr = x[..., -rd:].float().unflatten(-1, (-1, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    if inverse:
        sin = -sin
    y = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([x[..., :-rd], y], dim=-1)


def _native_rep(x: Tensor, cos: Tensor, sin: Tensor) -> int:
    """x rows per cos row when ``_C.rope_rows`` can serve the call (CPU, float32 / bf16 x, float32 tables,
    each cos row broadcast over consecutive rows of x), else 0."""
    xs, cs = x.shape, cos.shape
    if (x.dtype not in _NATIVE_DTYPES or cos.dtype != torch.float32 or sin.dtype != torch.float32
            or sin.shape != cs or x.device.type != "cpu" or cos.device.type != "cpu" or not xs
            or 2 * cs[-1] > xs[-1] or _native("rope_rows") is None):
        return 0
    lead, cl = xs[:-1], cs[:-1]
    k = len(lead) - len(cl)
    if k < 0:
        return 0
    cl = (1,) * k + cl
    k = len(cl)
    while k and cl[k - 1] == 1:
        k -= 1
    if cl[:k] != lead[:k]:
        return 0
    rep = 1
    for n in lead[k:]:
        rep *= n
    return rep if x.numel() else 0
