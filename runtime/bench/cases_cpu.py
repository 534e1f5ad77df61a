"""CPU cases (docs/performance.md section 4, last paragraph): the FP4 GEMV/GEMM at V4-Flash expert shapes
and on a 4096 x 4096 MXFP4 matrix, the FP8 block GEMM at the V4-Flash dense projections (wq_a, wkv, wo_b,
the shared expert) for M = 1, 8, 64, 512, the KV compressor and router at model shapes, plus the other
native ops at decode sizes.

The runner times every variant of the cpu backend (cpu/native, cpu/numpy, cpu/torch) and reports each
one's ratio to cpu/numpy and to the cpu/torch composite. The 4096 x 4096 GEMV also times the native
kernel alone (``_C.fp4_gemm (kernel only)``), without the wrapper's per-call cost; on CPUs with
AVX512-BF16 the prefill-size GEMMs also time cpu/native on its AVX-512 FP32 path (the blocked kernels
without vdpbf16ps), the comparison the blocked BF16 path is judged by.
"""
from __future__ import annotations

from typing import Any

import torch

from ..backends.cpu import native_isa, native_isa_cap
from .case import BenchCase
from .inputs import e4m3, e8m0, mxfp4, normal, routed_ids

__all__ = ["cpu_cases", "KERNEL_ONLY", "AVX512_FP32"]

KERNEL_ONLY = "_C.fp4_gemm (kernel only)"
AVX512_FP32 = "cpu/native AVX-512 FP32 path"   # the blocked GEMMs without AVX512-BF16 (set_isa('avx512'))


def _kernel_only(args: dict[str, Any]):
    """The native GEMM kernel on NumPy buffers prepared outside the timing (no wrapper, no output
    allocation): separates the kernel from the per-call Python/torch cost, which the cache flush before
    every timed call makes ~0.2 ms on a small CPU."""
    import numpy as np
    from dsv4rt import _C

    x, w, s = args["x"], args["w"], args["w_scale"]
    xa = x.view(torch.int16).numpy() if x.dtype == torch.bfloat16 else x.float().numpy()
    wa, sa = w.view(torch.uint8).numpy(), s.view(torch.uint8).numpy()
    ya = np.empty((x.shape[0], w.shape[0]), np.int16 if x.dtype == torch.bfloat16 else np.float32)
    return lambda: _C.fp4_gemm(xa, wa, sa, ya)


def _bf16_path() -> bool:
    """True where cpu/native's prefill GEMMs take the AVX512-BF16 path (the CPU has it, _C is built)."""
    return native_isa() == "avx512_bf16"


def _on_isa(isa: str, op: str, args: dict[str, Any]):
    """cpu/native's ``op`` with the hand-written kernels capped at ``isa`` for the call: the same wrapper
    and threads, another kernel path."""
    from dsv4rt.backends.cpu import native

    fn = getattr(native, op)

    def call():
        with native_isa_cap(isa):
            return fn(**args)
    return call


def _gemv_target(fraction: float, ratios: dict[str, float]) -> bool:
    """docs/performance.md: >= 50% of the measured read bandwidth and >= 10x the NumPy variant."""
    return fraction >= 0.5 and ratios.get("cpu/numpy", 0.0) >= 10.0


def _fp4(m: int, n: int, k: int, target: str = "") -> BenchCase:
    def make(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        w, s = mxfp4(n, k, device, gen)
        return {"x": normal((m, k), device, gen), "w": w, "w_scale": s, "act_quant": None}
    return BenchCase(f"fp4_gemm[M{m}-N{n}-K{k}]", "fp4_gemm", make, bytes=n * k * (0.5 + 1 / 32) + 2 * m * (k + n),
                     flops=2 * m * n * k, devices=("cpu",), target=target, meets=_gemv_target if target else None)


def _grouped(t: int, quick: bool) -> BenchCase:
    dim, inter, e, k = (256, 128, 16, 6) if quick else (4096, 2048, 256, 6)

    def make(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        ids = routed_ids(t, e, k, device, gen)
        counts = torch.bincount(ids.flatten().long(), minlength=e)
        offsets = torch.zeros(e + 1, dtype=torch.int32)
        offsets[1:] = counts.cumsum(0)
        w, s = mxfp4(2 * inter, dim, device, gen, lead=(e,))
        return {"x": normal((t * k, dim), device, gen), "w": w, "w_scale": s, "offsets": offsets, "act_quant": None}
    return BenchCase(f"fp4_grouped_gemm[T{t}-gate_up]", "fp4_grouped_gemm", make,
                     bytes=min(e, t * k) * 2 * inter * dim * (0.5 + 1 / 32) + 2 * t * k * (dim + 2 * inter),
                     flops=2 * t * k * 2 * inter * dim, devices=("cpu",))


def _attention(quick: bool) -> BenchCase:
    h, d, n_sel, pool = (8, 128, 128, 512) if quick else (64, 512, 640, 4096)

    def make(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        return {"q": normal((1, 1, h, d), device, gen), "kv": normal((1, pool, d), device, gen),
                "idx": torch.randint(0, pool, (1, 1, n_sel), dtype=torch.int32, generator=gen),
                "sink": normal((h,), device, gen, torch.float32), "scale": d ** -0.5, "return_lse": False}
    return BenchCase(f"sparse_attention[decode-n{n_sel}]", "sparse_attention", make,
                     bytes=n_sel * d * 2 + 2 * h * d * 2, flops=2 * h * n_sel * 2 * d, devices=("cpu",))


def _indexer(quick: bool) -> BenchCase:
    h, d, n, topk = (8, 64, 1024, 64) if quick else (64, 128, 16384, 512)

    def make(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        return {"q": normal((1, 1, h, d), device, gen), "k": normal((1, n, d), device, gen),
                "weights": normal((1, 1, h), device, gen, torch.float32),
                "visible": torch.full((1, 1), n, dtype=torch.int32), "topk": topk, "k_scale": None,
                "return_scores": False}
    return BenchCase(f"indexer_topk[decode-N{n}]", "indexer_topk", make, bytes=n * d * 2 + h * (2 * d + 4),
                     flops=2 * h * n * d, devices=("cpu",))


def _moe(t: int, quick: bool) -> list[BenchCase]:
    dim, e, k = (256, 16, 6) if quick else (4096, 256, 6)

    def dispatch(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        return {"x": normal((t, dim), device, gen), "ids": routed_ids(t, e, k, device, gen), "num_experts": e}

    def combine(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        return {"y_sorted": normal((t * k, dim), device, gen), "src": torch.randperm(t * k, generator=gen).to(torch.int32),
                "weights": torch.rand((t, k), generator=gen), "topk": None}
    nbytes = 2 * t * dim * (1 + k)
    return [BenchCase(f"moe_dispatch[T{t}]", "moe_dispatch", dispatch, bytes=nbytes, flops=0, devices=("cpu",)),
            BenchCase(f"moe_combine[T{t}]", "moe_combine", combine, bytes=nbytes, flops=2 * t * k * dim, devices=("cpu",))]


# V4-Flash dense FP8 projections (N, K): attention wq_a, wkv, wo_b and the shared expert's w1/w3 and w2
FP8_SHAPES = {"wq_a": (1024, 4096), "wkv": (512, 4096), "wo_b": (4096, 8192), "shared_w13": (2048, 4096),
              "shared_w2": (4096, 2048)}


def _fp8(name: str, m: int, n: int, k: int) -> BenchCase:
    def make(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        return {"x": normal((m, k), device, gen), "w": e4m3((n, k), device, gen),
                "w_scale": e8m0(((n + 127) // 128, (k + 127) // 128), device, gen).view(torch.float8_e8m0fnu),
                "act_quant": "fp8"}
    case = BenchCase(f"fp8_gemm[{name}-M{m}-N{n}-K{k}]", "fp8_gemm", make,
                     bytes=n * k + ((n + 127) // 128) * ((k + 127) // 128) + 2 * m * (k + n),
                     flops=2 * m * n * k, devices=("cpu",))
    if m == 1:   # the GEMV goal
        case.target, case.meets = ">= 60% of read bandwidth", lambda fraction, ratios: fraction >= 0.6
    elif m >= 64 and _bf16_path():
        case.baselines[AVX512_FP32] = lambda args: _on_isa("avx512", "fp8_gemm", args)
        if m == 512:
            case.target = f">= 2x {AVX512_FP32}"
            case.meets = lambda fraction, ratios: ratios.get(AVX512_FP32, 0.0) >= 2.0
    return case


def _compress(s: int, ratio: int, quick: bool) -> BenchCase:
    d = 64 if quick else 512
    c = 2 * d if ratio == 4 else d

    def make(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        return {"kv": normal((1, s, c), device, gen, torch.float32), "gate": normal((1, s, c), device, gen, torch.float32),
                "ape": normal((ratio, c), device, gen, torch.float32), "ratio": ratio, "overlap": ratio == 4,
                "prev_kv": None, "prev_gate": None}
    return BenchCase(f"kv_compress[S{s}-ratio{ratio}]", "kv_compress", make, bytes=2 * s * c * 4 + s // ratio * d * 4,
                     flops=(8 if ratio == 4 else 4) * s * c, devices=("cpu",))


def _route(t: int, quick: bool) -> BenchCase:
    e, k = (16, 6) if quick else (256, 6)

    def make(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        return {"logits": normal((t, e), device, gen, torch.float32), "bias": normal((e,), device, gen, torch.float32, 0.1),
                "topk": k, "route_scale": 1.5, "score_func": "sqrtsoftplus", "hash_ids": None}
    return BenchCase(f"moe_route[T{t}-E{e}]", "moe_route", make, bytes=4 * t * (e + 2 * k), flops=8 * t * e,
                     devices=("cpu",))


def cpu_cases(quick: bool = False) -> list[BenchCase]:
    """Expert shapes at M = 1, 8, 64 (gate/up: N=2048, K=4096; down: N=4096, K=2048) and the 4096^2 GEMV."""
    if quick:
        cases = [_fp4(1, 256, 512), _fp4(8, 256, 512), _fp4(64, 256, 512), _grouped(4, True), _attention(True),
                 _indexer(True), *_moe(16, True), _fp8("small", 1, 256, 512), _fp8("small", 64, 256, 512),
                 _compress(256, 4, True), _compress(256, 128, True), _route(16, True)]
    else:
        cases = [_fp4(1, 4096, 4096, target=">= 50% of read bandwidth and >= 10x cpu/numpy")]
        if native_isa() is not None:
            cases[0].baselines[KERNEL_ONLY] = _kernel_only
        for m in (1, 8, 64):
            cases += [_fp4(m, 2048, 4096), _fp4(m, 4096, 2048)]
        if _bf16_path():
            for c in cases[-2:]:
                c.baselines[AVX512_FP32] = lambda args: _on_isa("avx512", "fp4_gemm", args)
        cases += [_grouped(1, False), _attention(False), _indexer(False), *_moe(64, False)]
        cases += [_fp8(name, m, n, k) for name, (n, k) in FP8_SHAPES.items() for m in (1, 8, 64, 512)]
        cases += [_compress(4096, 4, False), _compress(4096, 128, False), _route(1, False), _route(64, False),
                  _route(512, False)]
    return cases
