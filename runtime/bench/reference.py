"""Documented ceilings per machine class: the one place the bench keeps the figures that docs/measured-cpu.md and
docs/performance.md report for the machines we measure on.

A run's measured ceiling far below its machine's documented figure means another process (or a throttled
or different host behind the same name) took the machine while the probes ran, so the roofline it would
set is wrong (trust.py). A machine that matches no entry is judged only by its probes' agreement.
Figures are the low end of the documented range, in the ceilings' units (TB/s, TFLOP/s), for the full
probes (``dsv4rt bench`` without ``--quick``: the quick probes use buffers that partly fit in cache).
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

__all__ = ["Reference", "REFERENCES", "machine_identity", "reference_for"]


@dataclass(frozen=True)
class Reference:
    """One machine class: the identity fields it must match, its documented ceilings and where they are."""

    machine: str
    match: Mapping[str, Any]
    figures: Mapping[str, float] = field(default_factory=dict)
    source: str = ""


REFERENCES: tuple[Reference, ...] = (
    Reference("the 2-core AMD EPYC CI machine (AVX512-BF16, dsv4rt._C built)",
              {"device": "cpu", "cpu": "AMD EPYC", "family": "25", "model": "17", "threads": 2,
               "isa": "avx512_bf16"},
              {"read_tbs": 0.066, "bf16_tflops": 0.836, "fp32_tflops": 0.449},
              "docs/measured-cpu.md (native read ~66 GB/s, BF16 836-890 GFLOP/s, FP32 FMA 449-480 GFLOP/s)"),
    Reference("NVIDIA H100 80GB HBM3", {"device": "NVIDIA H100 80GB HBM3"},
              {"read_tbs": 3.03, "bf16_tflops": 789.0}, "docs/performance.md section 1"),
    Reference("NVIDIA H200", {"device": "NVIDIA H200"}, {"bf16_tflops": 789.0},
              "docs/performance.md device update (the H100 SXM's tensor-core rates; bandwidth not yet measured)"),
)


def _cpuinfo() -> dict[str, str]:
    """model name, cpu family and model of the first processor in /proc/cpuinfo ({} where there is none)."""
    wanted = {"model name": "cpu", "cpu family": "family", "model": "model"}
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                name = wanted.get(key.strip())
                if name and name not in out:
                    out[name] = value.strip()
                if not line.strip() and out:
                    break
    except OSError:
        pass
    return out


def machine_identity(device: torch.device) -> dict[str, Any]:
    """The fields a :class:`Reference` matches: the GPU's name, or the CPU's model, threads and native ISA."""
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device)}
    if device.type != "cpu":
        return {"device": str(device)}
    from ..backends.cpu import native_isa

    ident: dict[str, Any] = {"device": "cpu", "cpu": platform.processor() or platform.machine()}
    ident.update(_cpuinfo())
    ident.update(threads=torch.get_num_threads(), isa=native_isa())
    return ident


def reference_for(identity: Mapping[str, Any] | None) -> Reference | None:
    """The documented machine class ``identity`` belongs to, or None for a machine we have no figures for."""
    if not identity:
        return None
    for ref in REFERENCES:
        if all(identity.get(k) == v for k, v in ref.match.items()):
            return ref
    return None
