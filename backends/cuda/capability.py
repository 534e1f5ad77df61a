"""What each ``cuda/triton`` op needs from an NVIDIA GPU, and what a detected compute capability runs, and why.

One table serves the launchers' ``supports()`` (so ``op.explain(...)`` gives the reason for a call) and the
backend probe (``dsv4rt info`` lists every op for the detected GPU). The facts behind it:

* No kernel uses an FP8 type: E4M3, E8M0 and E2M1 bytes are decoded with integer operations in registers
  (``kernels/decode.py``), so the FP8 ops (fp8_gemm, FP8 indexer keys, the V4.1 packed KV cache) need
  nothing that sm_80 lacks. No native-FP8 variant exists for sm_89+ (see that module for why).
* Six ops multiply on the tensor cores (``tl.dot`` with bf16 / fp16 / TF32 operands): those need sm_80
  (Ampere) or later. The others are loads, reductions and histograms.
* ``tools/compile_check.py`` compiles every kernel launch of the conformance run for the targets of
  :data:`COMPILE_CHECKED` without a GPU; no target has run the kernels on hardware yet
  (:data:`MEASURED` is empty). docs/gpu-support.md has the table per GPU generation.
"""
from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["MMA_OPS", "MIN_MMA_SM", "COMPILE_CHECKED", "MEASURED", "mma_refusal", "op_report"]

MMA_OPS = ("fp4_gemm", "fp4_grouped_gemm", "fp8_gemm", "indexer_topk", "indexer_scores", "sparse_attention")
"""Ops whose Triton kernel runs ``tl.dot`` on bf16 / fp16 / TF32 operands."""

MIN_MMA_SM = (8, 0)
"""bf16 and TF32 tensor-core MMAs arrived with Ampere (sm_80)."""

COMPILE_CHECKED: Mapping[str, str] = {
    "sm_80": "compiles (tools/compile_check.py, Triton 3.9.0, 2026-12-06)",
    "sm_86": "compiles (tools/compile_check.py, Triton 3.9.0, 2026-12-06)",
    "sm_89": "compiles (tools/compile_check.py, Triton 3.9.0, 2026-12-06)",
    "sm_90": "compiles as sm_90a (tools/compile_check.py, Triton 3.9.0, 2026-12-06)",
    "sm_100": "compiles as sm_100a (tools/compile_check.py, Triton 3.9.0, 2026-12-06)",
    "sm_120": "compiles as sm_120a (tools/compile_check.py, Triton 3.9.0, 2026-12-06)",
}
"""Compute capability -> the ahead-of-time compile check it passed (every kernel launch, 0 failures)."""

MEASURED: Mapping[str, str] = {}
"""Compute capability -> the GPU the kernels ran on with conformance passing. None yet."""


def _sm(cap: tuple[int, int]) -> str:
    return f"sm_{cap[0]}{cap[1]}"


def mma_refusal(t: torch.Tensor) -> str | None:
    """Why the tensor-core kernels cannot run on ``t``'s GPU (None when they can, or off-GPU)."""
    if not t.is_cuda or getattr(torch.version, "hip", None):
        return None
    cap = tuple(torch.cuda.get_device_capability(t.device))
    if cap < MIN_MMA_SM:
        return (f"cuda/triton multiplies on bf16 / TF32 tensor cores, which need sm_80+ (this GPU is "
                f"{_sm(cap)}); cuda/torch runs it")
    return None


def op_report(cap: tuple[int, int], ops: tuple[str, ...]) -> dict[str, str]:
    """op -> what ``cuda/triton`` does on a GPU of compute capability ``cap``, and why."""
    sm = _sm(cap)
    checked = COMPILE_CHECKED.get(sm)
    status = (f"measured: {MEASURED[sm]}" if sm in MEASURED else
              f"{checked}; not yet run on a GPU" if checked else
              f"{sm} is not in the compile check (tools/compile_check.py --targets {sm}{'a' if cap >= (9, 0) else ''})")
    out = {}
    for op in ops:
        if op in MMA_OPS and cap < MIN_MMA_SM:
            out[op] = f"cuda/torch: the Triton kernel needs bf16 / TF32 tensor cores (sm_80+), this GPU is {sm}"
        else:
            fp8 = " (FP8 decoded from the bits: no FP8 hardware needed)" if op in ("fp8_gemm", "indexer_topk",
                                                                                     "indexer_scores") else ""
            out[op] = f"cuda/triton{fp8}: {status}"
    return out
