"""Ceilings measured at the start of every bench run (never taken from a table): memory bandwidth and
matrix throughput of the device the run is on."""
from __future__ import annotations

from typing import Any

import torch

from .timing import cold_data_flush, time_call

__all__ = ["measure_ceilings"]


def measure_ceilings(device: torch.device, quick: bool = False) -> dict[str, Any]:
    """read_tbs: read-only bandwidth (TB/s, a full reduction over a buffer far larger than any cache);
    copy_tbs: device-to-device copy (read + write counted); bf16_tflops (GPU) / fp32_tflops (CPU)."""
    n_bytes = (64 if quick else 1024) * 2**20
    buf = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(buf)
    read = time_call(lambda: buf.sum(), device, reps=5 if quick else 20)
    copy = time_call(lambda: dst.copy_(buf), device, reps=5 if quick else 20)
    out: dict[str, Any] = {
        "device": _device_name(device),
        "read_tbs": n_bytes / read["median_us"] / 1e6,
        "copy_tbs": 2 * n_bytes / copy["median_us"] / 1e6,
    }
    if device.type == "cpu":
        n = 512 if quick else 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = time_call(lambda: a @ b, device, reps=3 if quick else 10)
        out["fp32_tflops"] = 2 * n**3 / t["median_us"] / 1e6
        out["threads"] = torch.get_num_threads()
        out["flush"] = ("the inputs' data evicted from every cache level (clflush), code and runtime state warm"
                        if cold_data_flush(device) else "a 256 MB buffer streamed through the caches")
    else:
        n = 2048 if quick else 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        t = time_call(lambda: a @ b, device, reps=5 if quick else 20)
        out["bf16_tflops"] = 2 * n**3 / t["median_us"] / 1e6
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import platform

        return platform.processor() or platform.machine()
    return str(device)
