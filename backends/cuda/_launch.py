"""Helpers shared by the Triton launchers (no Triton import here)."""
from __future__ import annotations

import contextlib
import functools
import importlib
from types import ModuleType

import torch
from torch import Tensor

__all__ = ["next_pow2", "device_guard", "on_interpreter", "kernels"]


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    """Makes t's GPU current for the launch (no-op for the interpreter's CPU tensors)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def on_interpreter(t: Tensor) -> bool:
    """True when the kernels run under the Triton interpreter (CPU tensors): interpreter block sizes."""
    return t.device.type != "cuda"


@functools.cache
def kernels(family: str) -> ModuleType:
    """The @triton.jit module of one op family (imports Triton); called on the first launch only."""
    return importlib.import_module(f"{__package__}.kernels.{family}")
