"""Argument checks shared by the op declarations. Each raises ContractError naming op and argument."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from ..errors import ContractError

FLOAT_ACT = (torch.float32, torch.bfloat16, torch.float16)
FP4_PACKED = (torch.uint8, torch.int8, torch.float4_e2m1fn_x2)
E8M0 = (torch.uint8, torch.float8_e8m0fnu)
E8M0_OR_F32 = E8M0 + (torch.float32,)
INDEX = (torch.int32,)
MAX_INT32 = 2**31 - 1
"""The largest count an int32 index tensor can address (ids, offsets, positions)."""


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(op: str, name: str, t: Any, ndim: int, dtypes: Sequence[torch.dtype]) -> None:
    """t must be a torch.Tensor of rank ``ndim`` and one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise ContractError(op, name, f"a torch.Tensor of rank {ndim}", type(t).__name__)
    if t.dim() != ndim:
        raise ContractError(op, name, f"rank {ndim}", f"rank {t.dim()} with shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ContractError(op, name, f"dtype {_names(dtypes)}", str(t.dtype).replace("torch.", ""))


def shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int], meaning: str = "") -> None:
    """t.shape must equal ``expected`` (``meaning`` explains the symbols, e.g. '[N, K/2]')."""
    if tuple(t.shape) != tuple(expected):
        what = f"shape {meaning} = {tuple(expected)}" if meaning else f"shape {tuple(expected)}"
        raise ContractError(op, name, what, f"shape {tuple(t.shape)}")


def integer(op: str, name: str, v: Any, lo: int | None = None, hi: int | None = None) -> None:
    """v must be a Python int (bool excluded) in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ContractError(op, name, "an int", repr(v))
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f"an int in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ContractError(op, name, bounds, repr(v))


def number(op: str, name: str, v: Any, positive: bool = False) -> None:
    """v must be a finite real number (positive if asked)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise ContractError(op, name, "a finite number", repr(v))
    if positive and v <= 0:
        raise ContractError(op, name, "a positive number", repr(v))


def choice(op: str, name: str, v: Any, allowed: Sequence[Any]) -> None:
    """v must be one of ``allowed``."""
    if v not in allowed:
        raise ContractError(op, name, "one of " + ", ".join(repr(a) for a in allowed), repr(v))


def flag(op: str, name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise ContractError(op, name, "a bool", repr(v))


def same_dtype(op: str, name: str, t: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if t.dtype != other.dtype:
        raise ContractError(op, name, f"the dtype of '{other_name}' ({other.dtype})", str(t.dtype))


# ---- value checks (read tensor contents; the dispatcher runs them only where that costs no sync) ----

def e8m0_finite(op: str, name: str, scale: torch.Tensor) -> None:
    """E8M0 scales must not hold the NaN byte 255; fp32 scales must be finite and positive."""
    if scale.numel() == 0:
        return
    if scale.dtype == torch.float32:
        bad = ~torch.isfinite(scale) | (scale <= 0)
        if bool(bad.any()):
            pos = tuple(int(i) for i in bad.nonzero()[0])
            raise ContractError(op, name, "finite positive float32 scales",
                                f"{float(scale[pos])} at index {pos}")
        return
    raw = scale.view(torch.uint8)
    if int(raw.max()) < 255:  # one reduction on the fast path
        return
    bad = raw == 255
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise ContractError(op, name, "finite E8M0 scales (byte 255 is NaN)", f"byte 255 at index {pos}")


def index_range(op: str, name: str, t: torch.Tensor, lo: int, hi: int, allow_minus_one: bool = False) -> None:
    """Every entry must lie in [lo, hi) (or be -1 when allowed)."""
    if t.numel() == 0:
        return
    low, high = torch.aminmax(t)
    if int(high) < hi and int(low) >= (-1 if allow_minus_one and lo == 0 else lo):
        return  # integers: with lo == 0, every value in [-1, hi) is -1 or in range
    valid = (t >= lo) & (t < hi)
    if allow_minus_one:
        valid |= t == -1
    if not bool(valid.all()):
        pos = tuple(int(i) for i in (~valid).nonzero()[0])
        rng = f"[{lo}, {hi})" + (" or -1" if allow_minus_one else "")
        raise ContractError(op, name, f"entries in {rng}", f"{int(t[pos])} at index {pos}")


def finite(op: str, name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        pos = tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0])
        raise ContractError(op, name, "finite values", f"{float(t[pos])} at index {pos}")
