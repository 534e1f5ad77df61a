"""Ceilings measured at the start of every bench run (never taken from a table): memory bandwidth and
matrix throughput of the device the run is on.

Every probe runs in ``passes`` passes, interleaved (pass 1 of every probe, then pass 2, ...), so that a
burst of load from another process shows up as passes that disagree rather than as one low figure;
each ceiling is its best pass, and every pass is kept under ``"passes"`` for trust.py to judge."""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..backends.cpu import native_isa
from .reference import machine_identity
from .timing import cold_data_flush, time_call

__all__ = ["measure_ceilings", "matrix_peak", "roofline_keys", "CEILING_NAMES", "fmt_ceiling", "PASSES"]

PASSES = 3  # passes per probe: the fewest whose median says whether the best pass was a fluke

# ceiling key -> name in the report; *_tbs are bandwidths (printed in GB/s), *_tflops rates (GFLOP/s)
CEILING_NAMES = {"read_tbs": "read", "torch_read_tbs": "torch sum", "native_read_tbs": "native read",
                 "copy_tbs": "copy", "bf16_tflops": "BF16", "fp32_tflops": "FP32", "sgemm_tflops": "FP32 sgemm"}
_MATRIX_KEYS = ("bf16_tflops", "fp32_tflops", "sgemm_tflops")   # the roofline's preference order


def fmt_ceiling(key: str, value: float) -> str:
    """``value`` of ceiling ``key`` in the report's units: '4.37 GB/s', '836 GFLOP/s'."""
    return f"{value * 1e3:.3g} {'GB/s' if key.endswith('_tbs') else 'GFLOP/s'}"


def roofline_keys(ceilings: dict[str, Any]) -> tuple[str, str]:
    """The two ceilings the roofline divides by: the read bandwidth and the matrix rate of matrix_peak."""
    for key in _MATRIX_KEYS:
        if ceilings.get(key):
            return "read_tbs", key
    raise KeyError("ceilings hold no matrix rate (bf16_tflops, fp32_tflops or sgemm_tflops)")


def matrix_peak(ceilings: dict[str, Any]) -> tuple[str, float]:
    """(name, TFLOP/s) of the matrix ceiling the roofline uses: the best measured rate of the device
    (BF16 where measured, else FP32; on CPU the instruction peaks, torch's sgemm where _C is not built)."""
    key = roofline_keys(ceilings)[1]
    return CEILING_NAMES[key], float(ceilings[key])


def measure_ceilings(device: torch.device, quick: bool = False, passes: int = PASSES) -> dict[str, Any]:
    """read_tbs: read-only bandwidth (TB/s, a full reduction over a buffer far larger than any cache; on CPU
    the faster of torch's sum and dsv4rt._C's streaming read in each pass, torch's kept as torch_read_tbs);
    copy_tbs: device-to-device copy (read + write counted); bf16_tflops (GPU: a bf16 matmul; CPU: vdpbf16ps
    register chains, where the CPU has AVX512-BF16); CPU: fp32_tflops (FMA register chains) and
    sgemm_tflops (torch's float32 matmul, a library rate, for reference). Also: device, machine (the
    identity reference.py matches), passes (key -> every pass's figure)."""
    probes = _probes(device, quick)
    samples: dict[str, list[float]] = {k: [] for k in probes}
    for _ in range(max(1, passes)):
        for key, probe in probes.items():
            samples[key].append(probe())
    native = samples.pop("native_read_tbs", None)
    samples["read_tbs"] = [max(pair) for pair in zip(samples["torch_read_tbs"], native or samples["torch_read_tbs"])]
    if native is None:
        del samples["torch_read_tbs"]   # read_tbs is torch's own figure
    else:
        samples["native_read_tbs"] = native
    out: dict[str, Any] = {"device": _device_name(device), "machine": machine_identity(device)}
    out.update({k: max(v) for k, v in samples.items() if k != "native_read_tbs"})
    if device.type == "cpu":
        out["threads"] = torch.get_num_threads()
        out["flush"] = ("the inputs' data evicted from every cache level (clflush), code and runtime state warm"
                        if cold_data_flush(device) else "a 256 MB buffer streamed through the caches")
    out["passes"] = samples
    return out


def _rate(work: float, fn: Callable[[], Any], device: torch.device, reps: int) -> Callable[[], float]:
    """A probe: ``work`` (bytes or FLOPs) / the median time of ``fn``, in T-units per second."""
    return lambda: work / time_call(fn, device, reps=reps)["median_us"] / 1e6


def _probes(device: torch.device, quick: bool) -> dict[str, Callable[[], float]]:
    """Ceiling key -> a callable measuring it once (one pass)."""
    n_bytes = (64 if quick else 1024) * 2**20
    buf = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(buf)
    reps = 5 if quick else 20
    probes = {"torch_read_tbs": _rate(n_bytes, lambda: buf.sum(), device, reps),
              "copy_tbs": _rate(2 * n_bytes, lambda: dst.copy_(buf), device, reps)}
    if device.type == "cpu":
        n = 512 if quick else 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        probes["sgemm_tflops"] = _rate(2 * n**3, lambda: a @ b, device, 3 if quick else 10)
        probes.update(_cpu_native_probes(buf, quick))
    else:
        n = 2048 if quick else 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        probes["bf16_tflops"] = _rate(2 * n**3, lambda: a @ b, device, reps)
    return probes


def _cpu_native_probes(buf: torch.Tensor, quick: bool) -> dict[str, Callable[[], float]]:
    """dsv4rt._C's probes (each call the best of its own seven runs): the streaming read of ``buf`` (vector
    loads with software prefetch on all threads, as the GEMV kernels read weights), the FP32 FMA and (with
    AVX512-BF16) vdpbf16ps peaks of all cores; empty where the extension is not usable (the roofline then
    uses torch's sum and sgemm rates)."""
    isa = native_isa()
    if isa is None:
        return {}
    from dsv4rt import _C
    iters = 1 << (18 if quick else 21)
    data = buf.view(torch.uint8).numpy()
    probes = {"native_read_tbs": lambda: _C.read_gbps(data) / 1e3,
              "fp32_tflops": lambda: _C.peak_gflops("fp32", iters) / 1e3}
    if isa == "avx512_bf16":
        probes["bf16_tflops"] = lambda: _C.peak_gflops("bf16", iters) / 1e3
    return probes


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import platform

        return platform.processor() or platform.machine()
    return str(device)
