"""A conformance case: stable id, inputs drawn from a seeded generator, and what must happen."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["Case", "case_generator", "bad_cases", "rand_mxfp4", "rand_e4m3", "rand_e8m0", "noncontig_on"]


@dataclass
class Case:
    """One call of one op.

    ``make(gen)`` returns the keyword arguments (CPU tensors). ``noncontig`` names tensor arguments the
    runner makes non-contiguous on the target device. ``raises`` names the argument a ContractError must
    name (a bad-input case); such cases run with value checks forced on.
    """

    op: str
    label: str
    make: Callable[[torch.Generator], dict[str, Any]]
    noncontig: tuple[str, ...] = ()
    raises: str | None = None
    tags: tuple[str, ...] = field(default=())

    @property
    def id(self) -> str:
        return f"{self.op}[{self.label}]"

    def seed(self, base: int) -> int:
        """A per-case seed: stable across runs and independent of which other cases run."""
        return (base * 1_000_003 + zlib.crc32(self.id.encode())) % (2**63)

    def inputs(self, base_seed: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(self.seed(base_seed))
        return self.make(gen)


def case_generator(fn: Callable[[], list[Case]]) -> Callable[[], list[Case]]:
    """Marks a function returning the list of cases for one op (ids must be unique)."""
    def wrapped() -> list[Case]:
        cases = fn()
        ids = [c.id for c in cases]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise AssertionError(f"duplicate conformance case ids: {sorted(dup)}")
        return cases
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


def bad_cases(op: str, good: Callable[[torch.Generator], dict[str, Any]],
              table: list[tuple[str, str, dict[str, Any]]]) -> list[Case]:
    """Bad-input cases from one valid call: each row is (label, the argument the ContractError must
    name, changes), a change being a value or a function of the valid arguments."""
    def edited(changes: dict[str, Any]) -> Callable[[torch.Generator], dict[str, Any]]:
        def make(gen: torch.Generator) -> dict[str, Any]:
            args = good(gen)
            for key, value in changes.items():
                args[key] = value(args) if callable(value) else value
            return args
        return make
    return [Case(op, f"bad-{label}", edited(changes), raises=arg) for label, arg, changes in table]


# ---- random weights in the released formats --------------------------------------------------------

def rand_e8m0(gen: torch.Generator, shape: tuple[int, ...], lo: int = 120, hi: int = 130) -> torch.Tensor:
    """E8M0 scale bytes uniformly in [lo, hi] (127 = 1.0), as torch.float8_e8m0fnu."""
    b = torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    return b.view(torch.float8_e8m0fnu)


def rand_mxfp4(gen: torch.Generator, n: int, k: int, lead: tuple[int, ...] = (), scale_lo: int = 120,
               scale_hi: int = 130, packed_dtype: torch.dtype = torch.uint8) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 weight [*lead, n, k/2] (every code appears) and E8M0 scales [*lead, n, k/32]."""
    w = torch.randint(0, 256, (*lead, n, k // 2), generator=gen, dtype=torch.int32).to(torch.uint8)
    if packed_dtype != torch.uint8:
        w = w.view(packed_dtype)
    return w, rand_e8m0(gen, (*lead, n, k // 32), scale_lo, scale_hi)


def rand_e4m3(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Random finite E4M3 values (every exponent, subnormals included), as torch.float8_e4m3fn."""
    b = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    b[(b & 0x7F) == 0x7F] = 0x3C  # the NaN codes -> 1.5
    return b.view(torch.float8_e4m3fn)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def noncontig_on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of t on ``device`` whose last dimension has stride 2 (so it is not contiguous)."""
    if t.dim() == 0 or t.numel() == 0:
        return t.to(device)
    wide = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=device)
    wide[..., ::2] = t.to(device)
    view = wide[..., ::2]
    assert not view.is_contiguous() or t.shape[-1] == 1
    return view
