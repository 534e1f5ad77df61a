"""Helpers shared by the Triton launchers (no Triton import here)."""
from __future__ import annotations

import contextlib
import functools
import importlib
from types import ModuleType

import torch
from torch import Tensor

__all__ = ["next_pow2", "device_guard", "on_interpreter", "on_ascend", "dot_precision", "core_count", "kernels"]


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    """Makes t's GPU (or Ascend NPU: ``torch.npu.device`` of torch_npu) current for the launch, so a kernel
    launches on the device that holds its tensors, not the current one (no-op for the interpreter's CPU
    tensors)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    if t.device.type == "npu":
        return torch.npu.device(t.device)   # type: ignore[attr-defined]
    return contextlib.nullcontext()


def on_interpreter(t: Tensor) -> bool:
    """True when the kernels run under the Triton interpreter: interpreter block sizes and ``INTERP``.

    The interpreter is the only Triton that takes CPU tensors, so a CPU tensor means the interpreter. GPU
    tensors and NPU tensors (``ascend/triton``, compiled by triton-ascend) get the device build and tiles."""
    return t.device.type == "cpu"


def on_ascend(t: Tensor) -> bool:
    """True for Ascend NPU tensors (``ascend/triton``): the kernels take their triton-ascend spellings."""
    return t.device.type == "npu"


def dot_precision(t: Tensor) -> str:
    """``input_precision`` of the float32 ``tl.dot`` for a launch on t's device: "hf32" on Ascend NPUs
    (triton-ascend refuses "tf32" and "tf32x3"), "tf32" on NVIDIA GPUs and under the interpreter."""
    return "hf32" if on_ascend(t) else "tf32"


def core_count(device: torch.device) -> int:
    """Programs a device runs at once, for grid sizing: multiprocessors of a CUDA GPU, cube (AI) cores of
    an Ascend NPU (``torch.npu.get_device_properties(...).cube_core_num``, torch_npu)."""
    if device.type == "npu":
        return int(torch.npu.get_device_properties(device).cube_core_num)   # type: ignore[attr-defined]
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def kernels(family: str) -> ModuleType:
    """The @triton.jit module of one op family (imports Triton); called on the first launch only."""
    return importlib.import_module(f"{__package__}.kernels.{family}")
