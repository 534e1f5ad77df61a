"""Random inputs generated directly on the bench device (no multi-GB host temporaries)."""
from __future__ import annotations

import torch

__all__ = ["mxfp4", "e4m3", "e8m0", "normal", "routed_ids", "expected_touched"]


def _bytes(shape: tuple[int, ...], device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=gen)


def e8m0(shape: tuple[int, ...], device: torch.device, gen: torch.Generator, lo: int = 118,
         hi: int = 126) -> torch.Tensor:
    """E8M0 scale bytes in a narrow realistic band (docs/performance.md section 5)."""
    return torch.randint(lo, hi + 1, shape, dtype=torch.uint8, device=device, generator=gen)


def mxfp4(n: int, k: int, device: torch.device, gen: torch.Generator,
          lead: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed E2M1 [*lead, n, k/2] and E8M0 scales [*lead, n, k/32]."""
    return _bytes((*lead, n, k // 2), device, gen), e8m0((*lead, n, k // 32), device, gen)


def e4m3(shape: tuple[int, ...], device: torch.device, gen: torch.Generator) -> torch.Tensor:
    b = _bytes(shape, device, gen)
    b[(b & 0x7F) == 0x7F] = 0x3C
    return b.view(torch.float8_e4m3fn)


def normal(shape: tuple[int, ...], device: torch.device, gen: torch.Generator,
           dtype: torch.dtype = torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=device, generator=gen) * scale).to(dtype)


def routed_ids(t: int, e: int, k: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Uniform random routing: k distinct experts per token, int32."""
    scores = torch.rand((t, e), device=device, generator=gen)
    return scores.topk(k, dim=1).indices.to(torch.int32)


def expected_touched(t: int, e: int, k: int) -> float:
    """Expected number of distinct experts hit by t tokens under uniform routing."""
    return e * (1 - (1 - k / e) ** t)
