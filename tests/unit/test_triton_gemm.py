"""cuda/triton GEMM launchers (backends/cuda/gemm.py) under Triton's interpreter on CPU tensors.

Every check that runs a kernel happens in ONE fresh interpreter started with DSV4RT_TRITON_INTERPRET=1 and
TRITON_INTERPRET=1 (the variable must be set before the kernels are defined), which prints a JSON report
that the tests below read. Checked: the path the launcher plans for M=1 (small, split-K) and M=64 (large);
both paths against the float64 reference under the conformance tolerance, with poisoned outputs; the
grouped GEMM with empty experts (first, middle, last) on both paths; the FP8 activation quantiser bit for bit
against dsv4rt.formats.act_quant_fp8; and that importing the launcher module does not import Triton.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

TRITON = importlib.util.find_spec("triton") is not None
NEEDS_TRITON = pytest.mark.skipif(
    not TRITON, reason="SKIPPED LOUDLY: Triton is not installed, so the cuda/triton GEMM kernels are NOT "
                       "tested at all (pip install triton to run them under the interpreter)")

SCRIPT = r"""
import json, torch
from dsv4rt.backends.cuda import enable_interpreter
enable_interpreter()
from dsv4rt import formats, reference
from dsv4rt.backend import poisoned_outputs
from dsv4rt.conformance.case import rand_e4m3, rand_e8m0, rand_mxfp4
from dsv4rt.conformance.tolerance import gemm as tolerance
from dsv4rt.backends.cuda import gemm as G

gen = torch.Generator().manual_seed(1234)
out = {"plan": {}, "value": {}, "quant": {}, "quant-nonfinite": {}}

def randn(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(dtype)

def fp4_args(m, k=256, n=96, act=None, dtype=torch.bfloat16):
    w, s = rand_mxfp4(gen, n, k)
    return {"x": randn(m, k, dtype=dtype), "w": w, "w_scale": s, "act_quant": act}

def check(name, op, args, fn, **kw):
    with poisoned_outputs():
        y = fn(**args, **kw)
    refs = (getattr(reference, op)(**args),)
    c = tolerance(op, args, (y,), refs)
    out["value"][name] = {"passed": c.passed, "budget": c.budget, "message": c.message,
                          "dtype_ok": y.dtype == args["x"].dtype}

for m in (1, 64):
    p = G.plan("fp4_gemm", fp4_args(m))
    out["plan"][f"fp4_M{m}"] = {"path": p.path, "split_k": p.split_k}
    p = G.plan("fp8_gemm", {"x": randn(m, 256), "w": rand_e4m3(gen, (96, 256)), "act_quant": None})
    out["plan"][f"fp8_M{m}"] = {"path": p.path, "split_k": p.split_k}
grp = {"x": randn(6, 256), "w": rand_mxfp4(gen, 64, 256, lead=(256,))[0], "act_quant": None}
out["plan"]["grouped_decode"] = G.plan("fp4_grouped_gemm", grp).path
grp = {"x": randn(512, 256), "w": rand_mxfp4(gen, 64, 256, lead=(8,))[0], "act_quant": None}
out["plan"]["grouped_prefill"] = G.plan("fp4_grouped_gemm", grp).path

for path in ("small", "large"):
    for m, act, dt in ((1, None, torch.bfloat16), (64, None, torch.bfloat16), (20, "fp8", torch.bfloat16),
                       (5, None, torch.float16), (33, None, torch.float32)):
        check(f"fp4 {path} M{m} {act} {dt}", "fp4_gemm", fp4_args(m, act=act, dtype=dt), G.fp4_gemm, path=path)
    counts = [0, 5, 0, 0, 40, 3, 1, 0]
    w, s = rand_mxfp4(gen, 96, 256, lead=(len(counts),))
    off = torch.tensor([0] + torch.tensor(counts).cumsum(0).tolist(), dtype=torch.int32)
    for act in (None, "fp8"):
        args = {"x": randn(sum(counts), 256), "w": w, "w_scale": s, "offsets": off, "act_quant": act}
        check(f"grouped {path} empty-experts {act}", "fp4_grouped_gemm", args, G.fp4_grouped_gemm, path=path)
    args = {"x": randn(0, 256), "w": w, "w_scale": s, "offsets": torch.zeros(len(counts) + 1, dtype=torch.int32),
            "act_quant": None}
    y = G.fp4_grouped_gemm(**args, path=path)
    out["value"][f"grouped {path} no rows"] = {"passed": tuple(y.shape) == (0, 96), "budget": 0, "message": "",
                                                "dtype_ok": True}
    for m, n, k, f32 in ((1, 200, 300, False), (40, 256, 384, True), (64, 128, 256, False)):
        scale = torch.rand((-(-n // 128), -(-k // 128)), generator=gen) + 0.5 if f32 else \
            rand_e8m0(gen, (-(-n // 128), -(-k // 128)), 118, 126)
        args = {"x": randn(m, k), "w": rand_e4m3(gen, (n, k)), "w_scale": scale, "act_quant": None}
        check(f"fp8 {path} M{m}-N{n}-K{k} f32scale={f32}", "fp8_gemm", args, G.fp8_gemm, path=path)
    # V4.1: 32x32 weight blocks (per-column scale vectors in the kernel), 1x32 activation blocks
    for m, n, k, f32, act in ((1, 200, 300, False, None), (3, 72, 1280, False, "fp8"), (40, 130, 352, True, "fp8"),
                              (64, 96, 256, False, None)):
        sh = (-(-n // 32), -(-k // 32))
        scale = torch.rand(sh, generator=gen) + 0.5 if f32 else rand_e8m0(gen, sh, 116, 130)
        args = {"x": randn(m, k), "w": rand_e4m3(gen, (n, k)), "w_scale": scale, "act_quant": act, "block_size": 32}
        check(f"fp8 {path} bs32 M{m}-N{n}-K{k} f32scale={f32} {act}", "fp8_gemm", args, G.fp8_gemm, path=path)
    args = fp4_args(20, k=288, act="fp8")
    args["x"][:, 0] = 2.0 ** 20          # with 1x128 blocks the rest of the first 128 k would round to zero
    args["w"][:, 0] &= 0xF0
    args["act_block_size"] = 32
    check(f"fp4 {path} ab32 outlier", "fp4_gemm", args, G.fp4_gemm, path=path)

blocks = torch.tensor([0.0, 1e-9, 3e-5, 1.0, 7.5, 448.0, 1e4, 3e30])  # one magnitude per 128-wide block
for dt in (torch.float32, torch.bfloat16, torch.float16):
    k = 8 * 128 - 56  # last block partial
    x = torch.randn((5, 8 * 128), generator=gen) * blocks.repeat_interleave(128)
    x[1, 3] = 0.0
    x[2, :] = 2.0 ** -130 if dt == torch.float32 else 0.0
    x[3, :128] = torch.tensor([448.0, 1.0625, 1.1875, -3.25, 0.0107421875, -2.0 ** -10, 6.5, 300.0]).repeat(16)
    x[4, 130] = 448.00003  # next float32 above 448: its scale is 2 only with the exact float32(1/448)
    x = x[:, :k]
    if dt != torch.float32:
        x = x.clamp(-6e4, 6e4)
    x = x.to(dt)
    q, s = G.act_quant_fp8(x)
    rq, rs = formats.act_quant_fp8(x, 128)
    out["quant"][str(dt)] = {"q": bool(torch.equal(q.view(torch.int32), rq.view(torch.int32))),
                             "s": bool(torch.equal(s.view(torch.int32), rs.view(torch.int32))),
                             "shapes": [list(q.shape), list(s.shape), list(rq.shape), list(rs.shape)]}
out["quant32"] = {}
for dt in (torch.float32, torch.bfloat16):   # V4.1's 1x32 blocks, magnitudes changing every 32 k
    x = (torch.randn((7, 300), generator=gen) * torch.logspace(-12, 12, 10).repeat_interleave(32)[:300]).to(dt)
    x[2, 40] = float("nan"); x[3, 70] = float("inf")
    q, s = G.act_quant_fp8(x, 32)
    rq, rs = formats.act_quant_fp8(x, 32)
    out["quant32"][str(dt)] = {"q": bool(torch.equal(torch.where(q.isnan(), 0.0, q).view(torch.int32),
                                                     torch.where(rq.isnan(), 0.0, rq).view(torch.int32))
                                         and torch.equal(q.isnan(), rq.isnan())),
                               "s": bool(torch.equal(s.nan_to_num(1.0, 2.0).view(torch.int32),
                                                     rs.nan_to_num(1.0, 2.0).view(torch.int32))),
                               "shape": list(s.shape)}
x = torch.randn((6, 300), generator=gen)
x[0, 5] = float("inf"); x[1, 200] = float("-inf"); x[2, 3] = float("nan"); x[3, 7] = float("nan"); x[3, 9] = float("inf")
x[4, 290] = float("nan")   # one non-finite kind per block, rows 5 finite
def bits(t):   # every NaN as one pattern, the other values bit for bit (signed zeros included)
    return torch.where(t.isnan(), torch.full_like(t, float("nan")), t).view(torch.int32)
for dt in (torch.float32, torch.bfloat16):
    q, s = G.act_quant_fp8(x.to(dt))
    rq, rs = formats.act_quant_fp8(x.to(dt), 128)
    out["quant-nonfinite"][str(dt)] = {"q": bool(torch.equal(bits(q), bits(rq))), "s": bool(torch.equal(bits(s), bits(rs)))}
print("JSON" + json.dumps(out))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSV4RT_", "TRITON_"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def report() -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900,
                          env=_clean_env(DSV4RT_TRITON_INTERPRET="1", TRITON_INTERPRET="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("JSON")][-1]
    return json.loads(line[4:])


def test_import_does_not_import_triton() -> None:
    code = textwrap.dedent("""
        import sys
        import dsv4rt.backends.cuda.gemm
        print("triton" in sys.modules, any(m.startswith("dsv4rt.backends.cuda.kernels.") for m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


@NEEDS_TRITON
def test_plan_picks_small_path_for_decode_and_large_for_prefill(report: dict) -> None:
    plan = report["plan"]
    assert plan["fp4_M1"]["path"] == "small" and plan["fp4_M1"]["split_k"] > 1  # split-K exercised in CI
    assert plan["fp4_M64"]["path"] == "large" and plan["fp4_M64"]["split_k"] == 1
    assert plan["fp8_M1"]["path"] == "small" and plan["fp8_M64"]["path"] == "large"
    assert plan["grouped_decode"] == "small" and plan["grouped_prefill"] == "large"


@NEEDS_TRITON
@pytest.mark.parametrize("family", ["fp4 small", "fp4 large", "grouped small", "grouped large",
                                    "fp8 small", "fp8 large"])
def test_kernels_match_reference(report: dict, family: str) -> None:
    rows = {k: v for k, v in report["value"].items() if k.startswith(family)}
    assert rows, f"no {family} cases ran"
    bad = {k: v["message"] for k, v in rows.items() if not (v["passed"] and v["dtype_ok"])}
    assert not bad, bad


@NEEDS_TRITON
def test_grouped_empty_experts_on_both_paths(report: dict) -> None:
    for path in ("small", "large"):
        for case in ("empty-experts None", "empty-experts fp8", "no rows"):
            assert report["value"][f"grouped {path} {case}"]["passed"], (path, case)


@NEEDS_TRITON
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16", "torch.float16"])
def test_act_quant_fp8_bit_exact(report: dict, dtype: str) -> None:
    row = report["quant"][dtype]
    assert row["shapes"][0] == row["shapes"][2] and row["shapes"][1] == row["shapes"][3], row["shapes"]
    assert row["s"], "scales differ from dsv4rt.formats.act_quant_fp8"
    assert row["q"], "quantised values differ from dsv4rt.formats.act_quant_fp8"


@NEEDS_TRITON
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_act_quant_fp8_non_finite_blocks_as_formats(report: dict, dtype: str) -> None:
    """A block holding Inf has scale Inf, one holding NaN scale NaN, and q = x / s, as
    dsv4rt.formats.act_quant_fp8 (the kernel clamped an Inf block's scale to 2^126 before)."""
    row = report["quant-nonfinite"][dtype]
    assert row["s"], "scales of non-finite blocks differ from dsv4rt.formats.act_quant_fp8"
    assert row["q"], "quantised values of non-finite blocks differ from dsv4rt.formats.act_quant_fp8"


@NEEDS_TRITON
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_act_quant_fp8_block32_bit_exact(report: dict, dtype: str) -> None:
    """The quantiser with 1x32 blocks (V4.1) as dsv4rt.formats.act_quant_fp8(x, 32), non-finite blocks included."""
    row = report["quant32"][dtype]
    assert row["shape"] == [7, 10] and row["s"] and row["q"], row


@NEEDS_TRITON
@pytest.mark.parametrize("path", ["small", "large"])
def test_v41_block32_kernels_ran(report: dict, path: str) -> None:
    rows = {k: v for k, v in report["value"].items() if k.startswith(f"fp8 {path} bs32") or k == f"fp4 {path} ab32 outlier"}
    assert len(rows) == 5 and all(v["passed"] for v in rows.values()), rows
