"""Rotary embeddings of V4 (spec 9.3): interleaved pairs (2i, 2i+1) on the trailing ``rope_head_dim``
dims; compressed layers use ``compress_rope_theta`` with YaRN (no mscale), SWA layers and MTP the plain
``rope_theta`` table. The tables are built exactly as the reference ``precompute_freqs_cis`` (float32)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import SWA, ModelConfig

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

    def at(self, positions: Tensor | slice) -> tuple[Tensor, Tensor]:
        return self.cos[positions], self.sin[positions]


def rope_tables(cfg: ModelConfig, device: str | torch.device, max_seq_len: int | None = None) -> dict[str, RopeTable]:
    """``{"swa": plain table, "compressed": YaRN table}`` for every layer of ``cfg``."""
    n = max_seq_len or cfg.max_seq_len
    return {SWA: RopeTable(cfg.rope_head_dim, n, cfg.rope_theta, device=device),
            "compressed": RopeTable(cfg.rope_head_dim, n, cfg.compress_rope_theta, cfg.original_seq_len,
                                    cfg.rope_factor, cfg.beta_fast, cfg.beta_slow, device=device)}


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Rotate the trailing ``2 * cos.shape[-1]`` dims of x by interleaved pairs; ``cos``/``sin`` broadcast
    against ``x[..., :rd/2]`` (e.g. ``[S, 1, rd/2]`` for ``x [B, S, H, D]``). ``inverse`` rotates by the
    negative angle (the output de-rotation). Float32 math, x's dtype out, a new tensor."""
    rd = 2 * cos.shape[-1]
    xr = x[..., -rd:].float().unflatten(-1, (-1, 2))
    x0, x1 = xr[..., 0], xr[..., 1]
    if inverse:
        sin = -sin
    y = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([x[..., :-rd], y], dim=-1)
