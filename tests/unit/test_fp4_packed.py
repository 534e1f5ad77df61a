"""MXFP4 weights packed in place for cpu/native (backends/cpu/packed.py, csrc/fp4_packed*.cpp).

* The packed kernels give, bit for bit, the released layout's batch-invariant result for every row count
  (1-8 rows per expert on the few-rows kernel, more on the blocked GEMM with the packed tile decodes), in
  both modes, for bf16 / float32 x with act_quant on or off, raw random codes (every E2M1 code, -0
  included) and scales on both sides of 127, plain and grouped; and where they decline (a scale byte outside
  [2, 252], rows whose products leave float32's normal range) the unpacked fallback gives the same bits too.
* Packing is a permutation in place (same storage, same size) and unpacking restores every byte.
* A PackedMXFP4 reads as the released tensor everywhere else: torch ops, NumPy, cpu/numpy and cpu/torch
  variants, pickling.
* The CPU backend's load-time hook packs only what it can, and the model runs on packed experts with the
  same logits as on released ones.

Skipped, saying so, where the packed kernels do not run (no AVX512-BF16 + AVX512-VBMI, or no dsv4rt._C).
"""
from __future__ import annotations

import pickle

import pytest
import torch

from dsv4rt import invariant, ops, use_backend
from dsv4rt.backends.cpu import CpuBackend

try:
    from dsv4rt import _C
    from dsv4rt.backends.cpu.packed import PackedMXFP4, pack_mxfp4, packable
except ImportError:  # pragma: no cover - the extension was not built
    _C = None

pytestmark = pytest.mark.skipif(_C is None or not _C.fp4_packed_fast(),
                                reason="SKIPPED: the packed FP4 kernels need dsv4rt._C and a CPU with AVX512-BF16 "
                                       "and AVX512-VBMI")


def _weight(e: int, n: int, k: int, seed: int, lo: int = 100, hi: int = 151) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (e, n, k // 2), generator=g, dtype=torch.int32).to(torch.uint8)
    s = torch.randint(lo, hi, (e, n, k // 32), generator=g, dtype=torch.int32).to(torch.uint8)
    return w, s.view(torch.float8_e8m0fnu)


def _x(m: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    x[torch.rand(m, k, generator=g) < 1 / 16] = 0.0
    return x.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def _packed(w: torch.Tensor) -> torch.Tensor:
    return pack_mxfp4(w.clone())


def test_pack_is_an_in_place_permutation() -> None:
    w, _ = _weight(3, 48, 384, 1)
    p = w.clone()
    ptr = p.data_ptr()
    packed = pack_mxfp4(p)
    assert isinstance(packed, PackedMXFP4) and packed.data_ptr() == ptr
    raw = packed._plain
    assert not torch.equal(raw, w)                                   # the codes moved...

    def codes(t: torch.Tensor) -> torch.Tensor:                      # how often each E2M1 code occurs
        return torch.bincount(torch.cat([t.flatten() & 15, t.flatten() >> 4]).long(), minlength=16)

    assert torch.equal(codes(raw), codes(w))                          # ...within the same bytes
    assert torch.equal(packed.unpacked(), w)                          # ...and come back exactly


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("dtype,act", [(torch.bfloat16, "fp8"), (torch.float32, "fp8"), (torch.bfloat16, None)])
@pytest.mark.parametrize("mode", [True, False])
def test_packed_bits_equal_released_invariant(grouped: bool, dtype: torch.dtype, act: str | None, mode: bool) -> None:
    n, k = 80, 512
    for m in (1, 2, 3, 4, 5, 8, 9, 24):
        w, s = _weight(3 if grouped else 1, n, k, m)
        x = _x(m * (3 if grouped else 1), k, 100 + m, dtype)
        with invariant.mode(True):
            ref = (ops.fp4_grouped_gemm(x, w, s, torch.tensor([0, m, 2 * m, 3 * m], dtype=torch.int32), act)
                   if grouped else ops.fp4_gemm(x, w[0], s[0], act))
        wp = _packed(w) if grouped else _packed(w[0].contiguous())
        with invariant.mode(mode):
            got = (ops.fp4_grouped_gemm(x, wp, s, torch.tensor([0, m, 2 * m, 3 * m], dtype=torch.int32), act)
                   if grouped else ops.fp4_gemm(x, wp, s[0], act))
        assert torch.equal(_bits(got), _bits(ref)), (m, mode)


def test_declined_rows_and_scales_fall_back_to_the_same_bits() -> None:
    k = 256
    for lo, hi in ((0, 10), (245, 255), (120, 130)):
        w, s = _weight(2, 32, k, lo, lo, hi)
        wp = _packed(w)
        for m in (1, 3, 12):
            x = _x(2 * m, k, m, torch.float32)
            x[0] *= 1e-30                       # products below float32's normal range: the float32 GEMV
            offs = torch.tensor([0, m, 2 * m], dtype=torch.int32)
            with invariant.mode(True):
                ref = ops.fp4_grouped_gemm(x, w, s, offs)
                got = ops.fp4_grouped_gemm(x, wp, s, offs)
            assert torch.equal(ref.isnan(), got.isnan())
            assert torch.equal(_bits(ref.nan_to_num()), _bits(got.nan_to_num())), (lo, m)


def test_packed_weight_reads_as_released_everywhere() -> None:
    w, s = _weight(2, 32, 256, 7)
    wp = _packed(w)
    assert wp.shape == w.shape and wp.dtype == w.dtype and wp.is_contiguous()
    assert torch.equal(wp, w) and torch.equal(wp[1], w[1]) and torch.equal(wp.float(), w.float())
    assert (wp.numpy() == w.numpy()).all()
    assert torch.equal(pickle.loads(pickle.dumps(wp)), w)
    x = _x(5, 256, 3, torch.bfloat16)
    offs = torch.tensor([0, 2, 5], dtype=torch.int32)
    for variant in ("cpu/numpy", "cpu/torch"):
        with use_backend(variant):
            assert torch.equal(ops.fp4_grouped_gemm(x, wp, s, offs, "fp8"), ops.fp4_grouped_gemm(x, w, s, offs, "fp8"))


def test_backend_hook_packs_only_what_it_can(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = CpuBackend()
    w, s = _weight(2, 32, 256, 1, 120, 130)
    assert isinstance(cpu.prepare_weight("fp4_grouped_gemm", w.clone(), s), PackedMXFP4)
    assert packable("fp8_gemm", w, s) is not None
    odd, s_odd = _weight(2, 24, 256, 1, 120, 130)                     # N % 16 != 0
    assert "N % 16" in packable("fp4_grouped_gemm", odd, s_odd)
    assert cpu.prepare_weight("fp4_grouped_gemm", odd, s_odd) is odd
    w_bad, s_bad = _weight(1, 32, 256, 1, 250, 255)                  # scale bytes past 252
    assert "[2, 252]" in packable("fp4_grouped_gemm", w_bad, s_bad)
    monkeypatch.setenv("DSV4RT_CPU_PACK_FP4", "0")
    from dsv4rt import env

    env.refresh()
    try:
        assert packable("fp4_grouped_gemm", w, s) == "DSV4RT_CPU_PACK_FP4=0"
    finally:
        monkeypatch.delenv("DSV4RT_CPU_PACK_FP4")
        env.refresh()
    args = {"w": w, "w_scale": s}
    prepared = cpu.prepare_inputs("fp4_grouped_gemm", args)
    assert isinstance(prepared["w"], PackedMXFP4) and not isinstance(args["w"], PackedMXFP4)
    assert torch.equal(args["w"], prepared["w"])                     # the caller's tensor was not touched
