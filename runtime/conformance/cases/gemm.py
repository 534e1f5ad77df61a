"""Conformance cases of the GEMM family (fp4_gemm, fp4_grouped_gemm, fp8_gemm)."""
from __future__ import annotations

import torch

from ..case import Case, bad_cases, case_generator, rand_e4m3, rand_e8m0, rand_mxfp4, randn

BF16, F32, F16 = torch.bfloat16, torch.float32, torch.float16
_DT = {BF16: "bf16", F32: "f32", F16: "f16"}


def _outliers(x: torch.Tensor, w: torch.Tensor, fp4: bool) -> None:
    """In place: x[:, 0] = 2^20 and the weight zero at k = 0 (the E2M1 low nibble of byte 0, the E4M3 byte 0).
    With 1x128 activation blocks the other values of x's first 128-block then round to E4M3 zero, with 1x32
    blocks only those of its first 32-block: the products that remain tell the two block sizes apart (a
    power-of-two scale otherwise makes E4M3 rounding blind to the block size)."""
    x[:, 0] = 2.0**20
    b = w.view(torch.uint8).view(-1, w.shape[-1])
    if fp4:
        b[:, 0] &= 0xF0
    else:
        b[:, 0] = 0


def _fp4_case(m: int, n: int, k: int, dtype=BF16, act=None, scale=(120, 130), xmag=1.0, packed=torch.uint8,
              label: str = "", noncontig: tuple[str, ...] = (), act_block: int = 128, outliers: bool = False) -> Case:
    def make(gen: torch.Generator) -> dict:
        w, s = rand_mxfp4(gen, n, k, scale_lo=scale[0], scale_hi=scale[1], packed_dtype=packed)
        x = randn(gen, m, k, dtype=dtype, scale=xmag)
        if outliers:
            _outliers(x, w, True)
        return {"x": x, "w": w, "w_scale": s, "act_quant": act, "act_block_size": act_block}
    name = label or f"M{m}-N{n}-K{k}-{_DT[dtype]}" + (f"-{act}" if act else "") + \
        (f"-ab{act_block}" if act_block != 128 else "")
    return Case("fp4_gemm", name, make, noncontig=noncontig)


@case_generator
def fp4_gemm() -> list[Case]:
    """Decode (M=1), small and medium M, every activation dtype, fp8 activations, extreme scales, views."""
    cases = [
        _fp4_case(1, 256, 512),
        _fp4_case(7, 64, 96),
        _fp4_case(64, 256, 512),
        _fp4_case(33, 128, 256, dtype=F32),
        _fp4_case(16, 64, 128, dtype=F16),
        _fp4_case(1, 256, 512, act="fp8"),
        _fp4_case(48, 128, 384, act="fp8"),
        _fp4_case(8, 64, 256, scale=(1, 12), label="subnormal-scales"),
        _fp4_case(8, 64, 256, scale=(150, 160), xmag=1e3, act="fp8", label="large-magnitude"),
        _fp4_case(8, 64, 128, packed=torch.int8, label="int8-weights"),
        _fp4_case(8, 64, 128, packed=torch.float4_e2m1fn_x2, label="float4x2-weights"),
        _fp4_case(9, 64, 128, noncontig=("x", "w", "w_scale"), label="noncontiguous"),
        # V4.1: act_quant per 1x32 (act_block_size=32); K not a multiple of 128; outliers tell 32 from 128
        _fp4_case(1, 256, 512, act="fp8", act_block=32),
        _fp4_case(48, 128, 352, act="fp8", act_block=32),
        _fp4_case(3, 64, 96, act="fp8", act_block=32, dtype=F32),
        _fp4_case(1, 32, 5120, act="fp8", act_block=32, label="v41-K5120-M1"),
        _fp4_case(24, 40, 1280, act="fp8", act_block=32, label="v41-K1280-M24"),
        _fp4_case(5, 64, 288, act="fp8", act_block=32, outliers=True, label="outliers-ab32"),
        _fp4_case(20, 64, 288, act="fp8", act_block=128, outliers=True, label="outliers-ab128"),
        _fp4_case(6, 64, 128, act=None, act_block=32, label="ab32-without-act-quant"),
        _fp4_case(7, 64, 160, act="fp8", act_block=32, noncontig=("x", "w"), label="noncontiguous-ab32"),
    ]

    def good(gen):
        w, s = rand_mxfp4(gen, 32, 64)
        return {"x": randn(gen, 4, 64, dtype=BF16), "w": w, "w_scale": s, "act_quant": None}

    def nan_scale(a):
        s = a["w_scale"].view(torch.uint8).clone()
        s[3, 1] = 255
        return s

    cases += bad_cases("fp4_gemm", good, [
        ("x-rank", "x", {"x": lambda a: a["x"][0]}),
        ("x-dtype", "x", {"x": lambda a: a["x"].to(torch.int32)}),
        ("K-not-multiple-of-32", "x", {"x": lambda a: a["x"][:, :48], "w": lambda a: a["w"][:, :24]}),
        ("w-shape", "w", {"w": lambda a: a["w"][:, :16]}),
        ("w-dtype", "w", {"w": lambda a: a["w"].to(torch.float32)}),
        ("scale-shape", "w_scale", {"w_scale": lambda a: a["w_scale"][:, :1]}),
        ("scale-nan", "w_scale", {"w_scale": nan_scale}),
        ("act-quant", "act_quant", {"act_quant": "int4"}),
        ("x-not-tensor", "x", {"x": lambda a: a["x"].tolist()}),
        ("act-block-64", "act_block_size", {"act_block_size": 64, "act_quant": "fp8"}),
        ("act-block-float", "act_block_size", {"act_block_size": 32.0, "act_quant": "fp8"}),
        ("act-block-bool", "act_block_size", {"act_block_size": True}),
    ])
    return cases


def _grouped(counts: list[int], n: int, k: int, dtype=BF16, act=None, label: str = "",
             noncontig: tuple[str, ...] = (), act_block: int = 128, outliers: bool = False) -> Case:
    def make(gen: torch.Generator) -> dict:
        e = len(counts)
        w, s = rand_mxfp4(gen, n, k, lead=(e,))
        offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        x = randn(gen, sum(counts), k, dtype=dtype)
        if outliers:
            _outliers(x, w, True)
        return {"x": x, "w": w, "w_scale": s, "offsets": offsets, "act_quant": act, "act_block_size": act_block}
    return Case("fp4_grouped_gemm", label, make, noncontig=noncontig)


@case_generator
def fp4_grouped_gemm() -> list[Case]:
    """Uneven groups, empty experts (first, middle, last), every row to one expert, no rows at all."""
    cases = [
        _grouped([3, 0, 5, 1, 0, 7], 64, 128, label="E6-uneven-with-empty"),
        _grouped([0, 0, 12, 0], 128, 256, label="E4-all-rows-one-expert"),
        _grouped([1], 256, 512, label="E1-M1"),
        _grouped([0, 0, 0], 64, 64, label="E3-no-rows"),
        _grouped([5, 9, 2, 16], 64, 256, dtype=F32, label="E4-f32"),
        _grouped([6, 0, 10, 3], 128, 256, act="fp8", label="E4-fp8"),
        _grouped([4, 4, 4], 64, 128, noncontig=("x", "w"), label="E3-noncontiguous"),
        _grouped([6, 0, 10, 3], 128, 352, act="fp8", act_block=32, label="E4-fp8-ab32-K352"),
        _grouped([1, 2, 0, 1], 64, 288, act="fp8", act_block=32, outliers=True, label="E4-outliers-ab32"),
        _grouped([0, 20, 1], 48, 1280, act="fp8", act_block=32, label="E3-v41-K1280-ab32"),
    ]

    def good(gen):
        w, s = rand_mxfp4(gen, 32, 64, lead=(3,))
        return {"x": randn(gen, 6, 64, dtype=BF16), "w": w, "w_scale": s,
                "offsets": torch.tensor([0, 2, 2, 6], dtype=torch.int32), "act_quant": None}

    def offsets(values, dtype=torch.int32):
        return {"offsets": torch.tensor(values, dtype=dtype)}

    cases += bad_cases("fp4_grouped_gemm", good, [
        ("offsets-length", "offsets", offsets([0, 2, 6])),
        ("offsets-dtype", "offsets", offsets([0, 2, 2, 6], torch.int64)),
        ("offsets-total", "offsets", offsets([0, 2, 2, 5])),
        ("offsets-start", "offsets", offsets([1, 2, 2, 6])),
        ("offsets-decreasing", "offsets", offsets([0, 4, 2, 6])),
        ("w-rank", "w", {"w": lambda a: a["w"][0]}),
        ("act-block-16", "act_block_size", {"act_block_size": 16}),
    ])
    return cases


def _fp8_case(m: int, n: int, k: int, dtype=BF16, act=None, f32_scale=False, label: str = "",
              noncontig: tuple[str, ...] = (), nan_codes: int = 0, bs: int = 128, scale=(118, 126), xmag=1.0,
              outliers: bool = False) -> Case:
    def make(gen: torch.Generator) -> dict:
        sn, sk = -(-n // bs), -(-k // bs)
        scale_t = (torch.rand((sn, sk), generator=gen) * 0.01 + 1e-3) if f32_scale else \
            rand_e8m0(gen, (sn, sk), scale[0], scale[1])
        w = rand_e4m3(gen, (n, k))
        for i in range(nan_codes):   # E4M3 NaN codes 0x7F / 0xFF: their output column is NaN
            w.view(torch.uint8)[int(torch.randint(0, n, (1,), generator=gen)),
                                int(torch.randint(0, k, (1,), generator=gen))] = 0x7F | (0x80 * (i % 2))
        x = randn(gen, m, k, dtype=dtype, scale=xmag)
        if outliers:
            _outliers(x, w, False)
        return {"x": x, "w": w, "w_scale": scale_t, "act_quant": act, "block_size": bs}
    name = label or f"M{m}-N{n}-K{k}-{_DT[dtype]}" + (f"-{act}" if act else "") + (f"-bs{bs}" if bs != 128 else "")
    return Case("fp8_gemm", name, make, noncontig=noncontig)


@case_generator
def fp8_gemm() -> list[Case]:
    """128x128 block scales incl. partial edge blocks, E8M0 and fp32 scales, fp8 activations, E4M3 NaN codes."""
    cases = [
        _fp8_case(1, 256, 512),
        _fp8_case(64, 256, 384),
        _fp8_case(5, 200, 300, label="partial-blocks"),
        _fp8_case(17, 128, 256, dtype=F32),
        _fp8_case(8, 256, 256, f32_scale=True, label="fp32-scales"),
        _fp8_case(32, 192, 320, act="fp8", label="fp8-act-partial"),
        _fp8_case(8, 128, 256, noncontig=("x", "w_scale"), label="noncontiguous"),
        _fp8_case(6, 192, 256, nan_codes=5, label="nan-weight-codes"),
        _fp8_case(3, 128, 256, dtype=F32, nan_codes=3, label="nan-weight-codes-f32"),
        # V4.1: 32x32 weight blocks and 1x32 activation blocks (block_size=32); ragged N and K edges
        _fp8_case(1, 256, 512, bs=32),
        _fp8_case(4, 256, 512, act="fp8", bs=32),
        _fp8_case(5, 200, 300, bs=32, label="partial-blocks-bs32"),
        _fp8_case(64, 96, 160, act="fp8", bs=32, label="fp8-act-K160-bs32"),
        _fp8_case(37, 130, 328, bs=32, label="prefill-partial-bs32"),
        _fp8_case(33, 64, 256, dtype=F32, bs=32),
        _fp8_case(16, 64, 96, dtype=F16, act="fp8", bs=32),
        _fp8_case(8, 96, 256, f32_scale=True, bs=32, label="fp32-scales-bs32"),
        _fp8_case(24, 96, 256, f32_scale=True, act="fp8", bs=32, label="fp32-scales-prefill-bs32"),
        _fp8_case(1, 40, 5120, act="fp8", bs=32, label="v41-wq_a-K5120-M1"),
        _fp8_case(3, 64, 1280, act="fp8", bs=32, label="v41-wq_b-K1280-M3"),
        _fp8_case(32, 64, 1280, act="fp8", bs=32, label="v41-wq_b-K1280-M32"),
        _fp8_case(5, 64, 288, act="fp8", bs=32, outliers=True, label="outliers-bs32"),
        _fp8_case(20, 64, 288, act="fp8", bs=32, outliers=True, label="outliers-prefill-bs32"),
        _fp8_case(16, 64, 256, bs=32, scale=(1, 12), label="subnormal-scales-bs32"),
        _fp8_case(16, 64, 256, bs=32, scale=(5, 250), xmag=1e-20, label="wide-scales-bs32"),
        _fp8_case(6, 96, 256, bs=32, nan_codes=5, label="nan-weight-codes-bs32"),
        _fp8_case(12, 96, 256, bs=32, nan_codes=4, act="fp8", label="nan-weight-codes-prefill-bs32"),
        _fp8_case(8, 96, 192, bs=32, noncontig=("x", "w", "w_scale"), label="noncontiguous-bs32"),
    ]

    def good(gen):
        return {"x": randn(gen, 4, 256, dtype=BF16), "w": rand_e4m3(gen, (128, 256)),
                "w_scale": rand_e8m0(gen, (1, 2)), "act_quant": None}

    cases += bad_cases("fp8_gemm", good, [
        ("w-dtype", "w", {"w": lambda a: a["w"].view(torch.uint8)}),
        ("w-shape", "w", {"w": lambda a: a["w"][:, :128]}),
        ("scale-shape", "w_scale", {"w_scale": lambda a: a["w_scale"][:, :1]}),
        ("scale-negative", "w_scale", {"w_scale": torch.tensor([[1.0, -2.0]])}),
        ("block-64", "block_size", {"block_size": 64}),
        ("block-str", "block_size", {"block_size": "32"}),
        ("block-float", "block_size", {"block_size": 32.0}),
        ("scale-shape-for-bs32", "w_scale", {"block_size": 32}),
        ("scale-shape-bs32-for-128", "w_scale", {"w_scale": lambda a: rand_e8m0(torch.Generator().manual_seed(1), (4, 8))}),
    ])
    return cases
