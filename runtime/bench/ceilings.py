"""Ceilings measured at the start of every bench run (never taken from a table): memory bandwidth and
matrix throughput of the device the run is on."""
from __future__ import annotations

from typing import Any

import torch

from ..backends.cpu import native_isa
from .timing import cold_data_flush, time_call

__all__ = ["measure_ceilings", "matrix_peak"]


def matrix_peak(ceilings: dict[str, Any]) -> tuple[str, float]:
    """(name, TFLOP/s) of the matrix ceiling the roofline uses: the best measured rate of the device
    (BF16 where measured, else FP32; on CPU the instruction peaks, torch's sgemm where _C is not built)."""
    for key, name in (("bf16_tflops", "BF16"), ("fp32_tflops", "FP32"), ("sgemm_tflops", "FP32 sgemm")):
        if ceilings.get(key):
            return name, float(ceilings[key])
    raise KeyError("ceilings hold no matrix rate (bf16_tflops, fp32_tflops or sgemm_tflops)")


def measure_ceilings(device: torch.device, quick: bool = False) -> dict[str, Any]:
    """read_tbs: read-only bandwidth (TB/s, a full reduction over a buffer far larger than any cache; on CPU
    the faster of torch's sum and dsv4rt._C's streaming read, torch's kept as torch_read_tbs);
    copy_tbs: device-to-device copy (read + write counted); bf16_tflops (GPU: a bf16 matmul; CPU: vdpbf16ps
    register chains, where the CPU has AVX512-BF16); CPU: fp32_tflops (FMA register chains) and
    sgemm_tflops (torch's float32 matmul, a library rate, for reference)."""
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
        native_read = _cpu_read_probe(buf)
        if native_read:   # the faster of the two read probes is the ceiling
            out["torch_read_tbs"] = out["read_tbs"]
            out["read_tbs"] = max(out["read_tbs"], native_read)
        n = 512 if quick else 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = time_call(lambda: a @ b, device, reps=3 if quick else 10)
        out["sgemm_tflops"] = 2 * n**3 / t["median_us"] / 1e6
        out.update(_cpu_instruction_peaks(quick))
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


def _cpu_instruction_peaks(quick: bool) -> dict[str, float]:
    """FP32 FMA and (with AVX512-BF16) vdpbf16ps peaks of all cores, from dsv4rt._C's register-only probe;
    empty where the extension is not usable (the roofline then uses torch's sgemm rate)."""
    isa = native_isa()
    if isa is None:
        return {}
    from dsv4rt import _C
    iters = 1 << (18 if quick else 21)
    out = {"fp32_tflops": _C.peak_gflops("fp32", iters) / 1e3}
    if isa == "avx512_bf16":
        out["bf16_tflops"] = _C.peak_gflops("bf16", iters) / 1e3
    return out


def _cpu_read_probe(buf: torch.Tensor) -> float | None:
    """TB/s of dsv4rt._C's streaming read of buf (vector loads with software prefetch on all threads, as the
    GEMV kernels read weights), or None where the extension is not usable."""
    if native_isa() is None:
        return None
    from dsv4rt import _C
    return _C.read_gbps(buf.view(torch.uint8).numpy()) / 1e3


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import platform

        return platform.processor() or platform.machine()
    return str(device)
