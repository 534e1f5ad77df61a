"""V4-Flash cases of docs/performance.md section 4 (accelerator devices). ``quick`` shrinks every shape so
the same code path can be exercised on a CPU in tests."""
from __future__ import annotations

from typing import Any

import torch

from .case import BenchCase
from .inputs import expected_touched, mxfp4, normal, routed_ids

__all__ = ["gpu_cases"]

DIM, INTER, EXPERTS, TOPK = 4096, 2048, 256, 6


def _moe_layer(args: dict[str, Any], backend: str):
    """Routed MoE: route -> dispatch -> grouped FP4 (gate|up) -> clamped SwiGLU * weight -> grouped FP4
    (down) -> combine, every step a registry op on ``backend`` except the elementwise SwiGLU."""
    from .. import ops

    def run() -> torch.Tensor:
        ids, weights = ops.moe_route(args["logits"], args["bias"], TOPK, 1.5, backend=backend)
        xs, offsets, src = ops.moe_dispatch(args["x"], ids, args["num_experts"], backend=backend)
        h = ops.fp4_grouped_gemm(xs, args["w13"], args["s13"], offsets, "fp8", backend=backend)
        gate, up = h.float().chunk(2, dim=1)
        w_rows = weights.flatten()[src.long()].unsqueeze(1)
        h = (torch.nn.functional.silu(gate.clamp(max=10.0)) * up.clamp(-10.0, 10.0) * w_rows).to(xs.dtype)
        y = ops.fp4_grouped_gemm(h, args["w2"], args["s2"], offsets, "fp8", backend=backend)
        return ops.moe_combine(y, src, None, TOPK, backend=backend)
    return run


def _moe_case(t: int, target_us: float, quick: bool) -> BenchCase:
    dim, inter, e = (256, 128, 16) if quick else (DIM, INTER, EXPERTS)

    def make(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        w13, s13 = mxfp4(2 * inter, dim, device, gen, lead=(e,))
        w2, s2 = mxfp4(dim, inter, device, gen, lead=(e,))
        return {"x": normal((t, dim), device, gen), "logits": normal((t, e), device, gen, torch.float32),
                "bias": normal((e,), device, gen, torch.float32, 0.1), "num_experts": e,
                "w13": w13, "s13": s13, "w2": w2, "s2": s2}
    expert_bytes = (3 * dim * inter) * (0.5 + 1 / 32)
    touched = expected_touched(t, e, TOPK)
    return BenchCase(f"routed_moe[T{t}]", "moe_layer", make, bytes=touched * expert_bytes + 2 * t * dim * 2,
                     flops=t * TOPK * 2 * 3 * dim * inter, target=f"<= {target_us:g} us", target_us=target_us,
                     pipeline=_moe_layer, note="uniform random routing; both GEMMs W4A8")


def _gemm_case(m: int, n: int, k: int, target_us: float | None, quick: bool, target: str = "") -> BenchCase:
    if quick:
        m, n, k = min(m, 64), min(n, 256), min(k, 512)

    def make(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        w, s = mxfp4(n, k, device, gen)
        return {"x": normal((m, k), device, gen), "w": w, "w_scale": s, "act_quant": None}

    def cublas(args: dict[str, Any]):
        from ..formats import dequant_mxfp4

        wd = dequant_mxfp4(args["w"], args["w_scale"], dtype=torch.bfloat16)
        return lambda: args["x"] @ wd.T
    return BenchCase(f"fp4_gemm[M{m}-N{n}-K{k}]", "fp4_gemm", make,
                     bytes=n * k * (0.5 + 1 / 32) + 2 * m * (k + n), flops=2 * m * n * k,
                     target=target or (f"<= {target_us:g} us" if target_us else ""), target_us=target_us,
                     baselines={"cuBLAS BF16 (pre-dequantised)": cublas})


def _grouped_prefill(t: int, quick: bool) -> BenchCase:
    dim, inter, e = (256, 128, 16) if quick else (DIM, INTER, EXPERTS)
    rows = t * TOPK

    def make(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        ids = routed_ids(t, e, TOPK, device, gen)
        counts = torch.bincount(ids.flatten().long(), minlength=e)
        offsets = torch.zeros(e + 1, dtype=torch.int32, device=device)
        offsets[1:] = counts.cumsum(0)
        w, s = mxfp4(2 * inter, dim, device, gen, lead=(e,))
        return {"x": normal((rows, dim), device, gen), "w": w, "w_scale": s, "offsets": offsets, "act_quant": None}
    flops = 2 * rows * 2 * inter * dim
    return BenchCase(f"fp4_grouped_gemm[T{t}-gate_up]", "fp4_grouped_gemm", make,
                     bytes=e * 2 * inter * dim * (0.5 + 1 / 32) + 2 * rows * (dim + 2 * inter), flops=flops,
                     target=">= 400 TFLOP/s W4A16", target_us=flops / 400e12 * 1e6)


def _indexer_decode(b: int, n: int, fp8: bool, quick: bool) -> BenchCase:
    h, d, topk = (8, 64, 64) if quick else (64, 128, 512)
    n = min(n, 1024) if quick else n

    def make(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        args = {"q": normal((b, 1, h, d), device, gen), "weights": normal((b, 1, h), device, gen, torch.float32),
                "visible": torch.full((b, 1), n, dtype=torch.int32, device=device), "topk": topk,
                "k_scale": None, "return_scores": False}
        if fp8:
            args["k"] = normal((b, n, d), device, gen, torch.float32, 8).clamp(-448, 448).to(torch.float8_e4m3fn)
            args["k_scale"] = torch.rand((b, n), device=device, generator=gen) * 0.1
        else:
            args["k"] = normal((b, n, d), device, gen)
        return args
    key_bytes = d * (1 if fp8 else 2) + (4 if fp8 else 0)
    target = 65.0 if fp8 else 120.0
    return BenchCase(f"indexer_topk[decode-B{b}-N{n}-{'fp8' if fp8 else 'bf16'}]", "indexer_topk", make,
                     bytes=b * n * key_bytes + b * h * (2 * d + 4) + b * topk * 4, flops=2 * b * h * n * d,
                     target=f"logits <= {target:g} us, top-k <= 20 us", target_us=target + 20)


def _indexer_prefill(s: int, n: int, quick: bool) -> BenchCase:
    h, d, topk = (8, 64, 64) if quick else (64, 128, 512)
    s, n = (min(s, 64), min(n, 256)) if quick else (s, n)

    def make(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        pos = torch.arange(4 * n - s, 4 * n, device=device, dtype=torch.int32)
        return {"q": normal((1, s, h, d), device, gen), "k": normal((1, n, d), device, gen),
                "weights": normal((1, s, h), device, gen, torch.float32), "visible": ((pos + 1) // 4).unsqueeze(0),
                "topk": topk, "k_scale": None, "return_scores": False}
    return BenchCase(f"indexer_topk[prefill-S{s}-N{n}-bf16]", "indexer_topk", make,
                     bytes=n * d * 2 + s * h * (2 * d + 4) + s * topk * 4, flops=2 * s * h * n * d,
                     target="<= 3 ms BF16", target_us=3000.0)


def _attention(b: int, s: int, n_sel: int, target_us: float, quick: bool) -> BenchCase:
    h, d = (8, 128) if quick else (64, 512)
    b, s = (min(b, 4), min(s, 16)) if quick else (b, s)
    pool = max(4 * n_sel, 2048) if not quick else 256

    def make(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        idx = torch.randint(0, pool, (b, s, n_sel), dtype=torch.int32, device=device, generator=gen)
        return {"q": normal((b, s, h, d), device, gen), "kv": normal((b, pool, d), device, gen), "idx": idx,
                "sink": normal((h,), device, gen, torch.float32), "scale": d ** -0.5, "return_lse": False}
    return BenchCase(f"sparse_attention[{'decode' if s == 1 else 'prefill'}-B{b}-S{s}-n{n_sel}]", "sparse_attention",
                     make, bytes=b * s * (n_sel * d * 2 + 2 * h * d * 2 + n_sel * 4),
                     flops=2 * b * s * h * n_sel * 2 * d, target=f"<= {target_us:g} us", target_us=target_us)


def _dispatch(t: int, target_us: float | None, quick: bool, target: str) -> BenchCase:
    dim = 256 if quick else DIM

    def make(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        return {"x": normal((t, dim), device, gen), "ids": routed_ids(t, EXPERTS, TOPK, device, gen),
                "num_experts": EXPERTS}
    nbytes = 2 * t * dim * (1 + TOPK)  # read each token once, write k copies (docs/performance.md 3.4)
    return BenchCase(f"moe_dispatch[T{t}]", "moe_dispatch", make, bytes=nbytes, flops=0,
                     target=target, target_us=target_us if target_us else nbytes / 2.0e12 * 1e6)


def _combine(t: int, target_us: float | None, quick: bool, target: str) -> BenchCase:
    dim = 256 if quick else DIM

    def make(device: torch.device, gen: torch.Generator) -> dict[str, Any]:
        src = torch.randperm(t * TOPK, device=device, generator=gen).to(torch.int32)
        return {"y_sorted": normal((t * TOPK, dim), device, gen), "src": src,
                "weights": torch.rand((t, TOPK), device=device, generator=gen), "topk": None}
    nbytes = 2 * t * dim * (1 + TOPK)  # read k rows per token, write one
    return BenchCase(f"moe_combine[T{t}]", "moe_combine", make, bytes=nbytes, flops=2 * t * TOPK * dim,
                     target=target, target_us=target_us if target_us else nbytes / 2.0e12 * 1e6)


def gpu_cases(quick: bool = False) -> list[BenchCase]:
    """The section-4 table, in order."""
    t_big = 64 if quick else 4096
    return [
        _moe_case(1, 45.0, quick), _moe_case(64, 1300.0, quick),
        _grouped_prefill(256 if quick else 16384, quick),
        _gemm_case(1, 4096, 4096, 8.0, quick),
        _indexer_decode(4 if quick else 64, 16384, False, quick), _indexer_decode(4 if quick else 64, 16384, True, quick),
        _indexer_prefill(4096, 16384, quick),
        _attention(64, 1, 640, 35.0, quick), _attention(1, 4096, 640, 1200.0, quick),
        _dispatch(t_big, None, quick, ">= 2.0 TB/s"), _combine(t_big, None, quick, ">= 2.0 TB/s"),
        _dispatch(64, 10.0, quick, "<= 10 us"), _combine(64, 10.0, quick, "<= 10 us"),
    ]
