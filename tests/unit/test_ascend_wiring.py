"""WIRING tests of the ascend/fused implementations, on CPU tensors, with a recording stand-in for torch_npu.

Every stand-in op is bound (``torch.library``) to the real schemas of torch-npu 2.13.0 and 2.14.0
(``tests/data/ascend/``, extracted from the wheels by ``tools/ascend_schemas.py``): each test runs once per
release, so an argument name, keyword rule or type that drifts from a release fails here.

These prove that every fused implementation calls the documented torch_npu op with the documented argument
names, dtypes, layouts (ND / FRACTAL_NZ) and shapes, that the layout conversions around each call are
consistent with the op's *documented* semantics (the stand-in computes them in plain torch), and that
``supports()`` refuses the documented out-of-range cases with a reason naming the limit. They do NOT prove
that an NPU computes what the documents say: nothing here ran on Ascend hardware.

The implementation functions are device-agnostic; the backend registers them for device type "npu", and
these tests call them directly.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dsv4rt import reference as ref
from dsv4rt.backend import Registrar
from dsv4rt.backends.ascend import AscendBackend, FUSED_PRIORITY, COMPOSITE_PRIORITY
from dsv4rt.backends.ascend import fake_torch_npu
from dsv4rt.backends.ascend._npu import npu_dtype
from dsv4rt.backends.ascend.attention import WindowedIndex
from dsv4rt.backends.ascend.weights import LAYOUTS, Prep, PreparedWeight, prepare_weights, scale_key
from dsv4rt.conformance import tolerance
from dsv4rt.formats import quant_fp8_block, quant_mxfp4
from dsv4rt.registry import REGISTRY

A2, A3, C950 = 223, 253, 260
FACTS = sorted((Path(__file__).resolve().parents[1] / "data" / "ascend").glob("torch_npu-*.txt"))
_RELEASE: list[Path] = []


@pytest.fixture(autouse=True, params=FACTS, ids=[f.stem for f in FACTS])
def release(request):
    """Every test of this file runs against each torch_npu release's schemas."""
    _RELEASE[:] = [request.param]
    yield request.param
    _RELEASE.clear()

C = fake_torch_npu.DTYPE_CONSTANTS
FUSED_OPS = {"fp4_grouped_gemm", "fp4_gemm", "fp8_gemm", "moe_dispatch", "moe_combine", "indexer_topk",
             "sparse_attention"}


def load(monkeypatch, soc: int = A2, ops=None) -> SimpleNamespace:
    fake = fake_torch_npu.make(soc, ops, facts=_RELEASE[0] if _RELEASE else None)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    backend = AscendBackend()
    registrar = Registrar(backend, REGISTRY.specs)
    backend.load(registrar)
    impls = {(i.op, i.variant): i for i in registrar.implementations}
    return SimpleNamespace(fake=fake, rec=fake.recorder, impls=impls, backend=backend,
                           fused=lambda op: impls[(op, "fused")], torch=lambda op: impls[(op, "torch")])


@pytest.fixture
def a2(monkeypatch):
    return load(monkeypatch, A2)


@pytest.fixture
def c950(monkeypatch):
    return load(monkeypatch, C950)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def desc(dtype, shape, fmt=2, contiguous=True):
    return fake_torch_npu.TensorDesc(dtype, tuple(shape), fmt, contiguous)


def check(tol_fn, op: str, args: dict, outs) -> None:
    outs = outs if isinstance(outs, tuple) else (outs,)
    refs = getattr(ref, op)(**args)
    refs = refs if isinstance(refs, tuple) else (refs,)
    c = getattr(tolerance, tol_fn)(op, args, outs, refs)
    assert c.passed, c.message


# ----------------------------------------------------------------------------------------------- loading

def test_load_registers_fused_above_composite(a2):
    fused = {op for op, v in a2.impls if v == "fused"}
    assert fused == FUSED_OPS
    assert all(i.priority == FUSED_PRIORITY > COMPOSITE_PRIORITY for (op, v), i in a2.impls.items() if v == "fused")
    assert a2.fused("fp4_grouped_gemm").requires == {"npu_grouped_matmul"}
    assert a2.fused("moe_dispatch").requires == {"npu_moe_init_routing_v2"}
    assert a2.fused("moe_combine").requires == {"npu_moe_token_unpermute"}
    assert a2.fused("indexer_topk").requires == {"npu_lightning_indexer"}
    assert a2.fused("sparse_attention").requires == {"npu_fused_infer_attention_score"}
    assert all(i.device_type == "npu" for i in a2.impls.values())


def test_load_registers_only_the_ops_torch_npu_has(monkeypatch):
    env = load(monkeypatch, A2, ops=("npu_moe_init_routing_v2",))
    fused = {op for op, v in env.impls if v == "fused"}
    assert fused == {"moe_dispatch", "fp4_gemm", "fp8_gemm"}   # the dense BF16 matmul needs no torch_npu op
    caps = env.backend.probe().capabilities
    assert caps["npu_moe_init_routing_v2"] is True and caps["npu_grouped_matmul"] is False


def test_offers_declares_everything_load_registers(a2):
    offers = a2.backend.offers()
    for op, variant in a2.impls:
        assert variant in offers[op], (op, variant)


def test_dtype_constants_are_ints_passed_only_as_dtype_arguments(monkeypatch, release):
    fake = fake_torch_npu.make(C950, facts=release)
    assert isinstance(npu_dtype(fake, "float4_e2m1fn_x2"), int)
    assert isinstance(npu_dtype(fake, "float8_e8m0fnu"), int)
    del fake.float8_e4m3fn
    assert npu_dtype(fake, "float8_e4m3fn") is torch.float8_e4m3fn     # falls back to torch's dtype
    with pytest.raises(KeyError):
        npu_dtype(fake, "hifloat9")


# ------------------------------------------------------------------------------------ fp4_grouped_gemm

def experts(e=4, n=64, k=256, r=20, seed=0, x_dtype=torch.bfloat16):
    g = gen(seed)
    w, s = quant_mxfp4(torch.randn(e, n, k, generator=g))
    x = torch.randn(r, k, generator=g).to(x_dtype)
    cuts = sorted(torch.randint(0, r + 1, (e - 1,), generator=g).tolist())
    offsets = torch.tensor([0, *cuts, r], dtype=torch.int32)
    offsets[1] = offsets[0]                                   # one empty expert
    return x, w, s, offsets


@pytest.mark.parametrize("act_quant", [None, "fp8"])
def test_grouped_gemm_bf16_calls_grouped_matmul(a2, act_quant):
    x, w, s, off = experts()
    pw = prepare_weights(w, s, soc="A2")
    assert pw.prep.layout == "bf16-nd" and a2.rec.calls == []          # no torch_npu call to prepare ND BF16
    args = dict(x=x, w=pw, w_scale=s, offsets=off, act_quant=act_quant)
    assert a2.fused("fp4_grouped_gemm").supports(args) is None
    y = a2.fused("fp4_grouped_gemm").fn(x, pw, s, off, act_quant)
    (call,) = a2.rec.named("npu_grouped_matmul")
    e, n, k = w.shape[0], w.shape[1], x.shape[1]
    assert call.args["x"] == [desc(torch.bfloat16, (20, k))]
    assert call.args["weight"] == [desc(torch.bfloat16, (e, k, n))]
    assert call.args["group_list"] == desc(torch.int64, (e,))
    assert (call.args["group_type"], call.args["group_list_type"], call.args["split_item"]) == (0, 0, 3)
    assert call.args["output_dtype"] is torch.bfloat16
    assert all(call.args[a] is None for a in ("scale", "antiquant_scale", "per_token_scale", "x_dtype", "weight_dtype"))
    assert y.dtype == torch.bfloat16 and y.shape == (20, n)
    check("gemm", "fp4_grouped_gemm", dict(args, w=w), y)


def test_grouped_gemm_950_mxfp4_calls_dynamic_mx_quant_and_grouped_matmul(c950):
    x, w, s, off = experts()
    e, n, k = w.shape[0], w.shape[1], x.shape[1]
    pw = prepare_weights(w, s)                                        # soc from torch_npu: 950
    assert pw.prep.layout == "950-mxfp4-nz"
    (cast,) = c950.rec.named("npu_format_cast")
    assert cast.args == {"input": desc(torch.uint8, (e, n, k // 2)), "acl_format": 29,
                         "customize_dtype": torch.float8_e4m3fn, "input_dtype": C["float4_e2m1fn_x2"]}
    args = dict(x=x, w=pw, w_scale=s, offsets=off, act_quant="fp8")
    assert c950.fused("fp4_grouped_gemm").supports(args) is None
    y = c950.fused("fp4_grouped_gemm").fn(x, pw, s, off, "fp8")
    (mx,) = c950.rec.named("npu_dynamic_mx_quant")
    assert mx.args["input"] == desc(torch.bfloat16, (20, k))
    assert (mx.args["axis"], mx.args["block_size"], mx.args["scale_alg"], mx.args["round_mode"]) == (-1, 32, 1, "rint")
    assert mx.args["dst_type"] == C["float8_e4m3fn"]
    (call,) = c950.rec.named("npu_grouped_matmul")
    assert call.args["x"] == [desc(torch.float8_e4m3fn, (20, k))]
    assert call.args["weight"] == [desc(torch.uint8, (e, k // 2, n), fmt=29, contiguous=False)]   # transposed NZ view
    # the scale: a transposed [E, K/64, N, 2] view of [E, N, K/64, 2] memory, as vllm-ascend's 950 MoE passes it
    (scale,) = call.args["antiquant_scale"]
    assert scale == desc(torch.uint8, (e, k // 64, n, 2), contiguous=False)
    assert scale.stride == (n * k // 32, 2, k // 32, 1)
    assert call.args["per_token_scale"] == [desc(torch.uint8, (20, k // 64, 2))]
    for name, const in (("weight_dtype", "float4_e2m1fn_x2"), ("per_token_scale_dtype", "float8_e8m0fnu")):
        assert call.args[name] == C[const] and isinstance(call.args[name], int)
    assert call.args["x_dtype"] is None      # x is a native float8_e4m3fn tensor (graph mode rejects x_dtype)
    assert call.args["output_dtype"] is torch.bfloat16 and call.args["scale"] is None
    assert (call.args["group_type"], call.args["group_list_type"], call.args["split_item"]) == (0, 0, 3)
    # with the documented semantics the MXFP8 activations represent q(x) exactly: same result as composite
    assert torch.equal(y, c950.torch("fp4_grouped_gemm").fn(x, w, s, off, "fp8"))
    check("gemm", "fp4_grouped_gemm", dict(args, w=w), y)


def test_grouped_gemm_w8a8_is_opt_in_and_calls_dynamic_quant(a2):
    x, w, s, off = experts()
    with pytest.raises(ValueError, match="allow_lossy"):
        prepare_weights(w, s, layout="a2a3-w8a8-nz")
    pw = prepare_weights(w, s, layout="a2a3-w8a8-nz", allow_lossy=True)
    assert pw.prep.exact is False
    (cast,) = a2.rec.named("npu_format_cast")
    assert cast.args["input"] == desc(torch.int8, (4, 256, 64)) and cast.args["acl_format"] == 29
    y = a2.fused("fp4_grouped_gemm").fn(x, pw, s, off, None)
    (dq,) = a2.rec.named("npu_dynamic_quant")
    assert dq.args["input"] == desc(torch.bfloat16, (20, 256))
    (call,) = a2.rec.named("npu_grouped_matmul")
    assert call.args["x"] == [desc(torch.int8, (20, 256))]
    assert call.args["weight"] == [desc(torch.int8, (4, 256, 64), fmt=29)]
    assert call.args["scale"] == [desc(torch.bfloat16, (4, 64))]
    assert call.args["per_token_scale"] == [desc(torch.float32, (20,))]
    assert call.args["output_dtype"] is torch.bfloat16
    want = a2.torch("fp4_grouped_gemm").fn(x, w, s, off, None).float()
    assert float((y.float() - want).abs().max()) < 0.05 * float(want.abs().max())   # lossy, but close


def test_grouped_gemm_bf16_nz(monkeypatch):
    env = load(monkeypatch, A3)
    x, w, s, off = experts()
    pw = prepare_weights(w, s, layout="bf16-nz")
    env.fused("fp4_grouped_gemm").fn(x, pw, s, off, None)
    (call,) = env.rec.named("npu_grouped_matmul")
    assert call.args["weight"] == [desc(torch.bfloat16, (4, 256, 64), fmt=29)]


def meta_weight(layout: str, e: int, n: int, k: int, kind="mxfp4-grouped"):
    raw = torch.empty((e, n, k // 2), dtype=torch.uint8, device="meta")
    scale = torch.empty((e, n, k // 32), dtype=torch.uint8, device="meta")
    prep = Prep(layout, kind, torch.empty(0, device="meta"), None, tuple(raw.shape), scale_key(scale), True)
    return PreparedWeight.wrap(raw, prep), scale


@pytest.mark.parametrize("soc,case,expect", [
    (A2, "raw", "prepare_weights"),
    (C950, "raw", "FRACTAL_NZ"),
    (A2, "other-chip", "runs on 950"),
    (A2, "other-scale", "w_scale is not the scale"),
    (A2, "x-fp32", "needs bfloat16 x"),
    (A2, "x-fp16", "needs bfloat16 x"),
    (C950, "950-act-none", "act_quant=None"),
    (A2, "groups", "> 1024"),
    (A2, "inner", "< 65536"),
    (C950, "one-expert", "E = 1"),
    (C950, "k64", "K = 64"),
    (A2, "dense-kind", "not grouped"),
])
def test_grouped_gemm_supports_refuses(monkeypatch, soc, case, expect):
    env = load(monkeypatch, soc)
    sup = env.fused("fp4_grouped_gemm").supports
    x, w, s, off = experts()
    layout = "950-mxfp4-nz" if soc == C950 else "bf16-nd"
    args = dict(x=x, w=w, w_scale=s, offsets=off, act_quant="fp8")
    if case != "raw":
        pw, ps = meta_weight(layout, 4, 64, 256)
        args.update(w=pw, w_scale=ps, x=torch.empty(20, 256, dtype=torch.bfloat16, device="meta"))
    if case == "other-chip":
        args["w"], args["w_scale"] = meta_weight("950-mxfp4-nz", 4, 64, 256)
    elif case == "other-scale":
        args["w_scale"] = s
    elif case in ("x-fp32", "x-fp16"):
        args["x"] = args["x"].to(torch.float32 if case == "x-fp32" else torch.float16)
    elif case == "950-act-none":
        args["act_quant"] = None
    elif case == "groups":
        args["w"], args["w_scale"] = meta_weight(layout, 1025, 64, 256)
    elif case == "inner":
        args["w"], args["w_scale"] = meta_weight(layout, 4, 65536, 256)
    elif case == "one-expert":
        args["w"], args["w_scale"] = meta_weight(layout, 1, 64, 256)
    elif case == "k64":
        args["w"], args["w_scale"] = meta_weight(layout, 4, 64, 64)
        args["x"] = torch.empty(20, 64, dtype=torch.bfloat16, device="meta")
    elif case == "dense-kind":
        args["w"], args["w_scale"] = meta_weight(layout, 4, 64, 256, kind="mxfp4")
    reason = sup(args)
    assert reason and expect in reason, reason


def test_grouped_gemm_950_needs_dynamic_mx_quant(monkeypatch):
    env = load(monkeypatch, C950, ops=("npu_grouped_matmul", "npu_format_cast"))
    pw, ps = meta_weight("950-mxfp4-nz", 4, 64, 256)
    x = torch.empty(20, 256, dtype=torch.bfloat16, device="meta")
    reason = env.fused("fp4_grouped_gemm").supports(dict(x=x, w=pw, w_scale=ps, offsets=None, act_quant="fp8"))
    assert "npu_dynamic_mx_quant" in reason


def test_grouped_gemm_raw_weight_falls_back_without_calling_torch_npu(a2):
    """The selection cache keys on shape/dtype only, so the fused function re-checks and falls back."""
    x, w, s, off = experts()
    y = a2.fused("fp4_grouped_gemm").fn(x, w, s, off, None)
    assert a2.rec.calls == []
    assert torch.equal(y, a2.torch("fp4_grouped_gemm").fn(x, w, s, off, None))


def test_prepare_weights_rejects_bad_requests(a2):
    x, w, s, off = experts(k=96)
    with pytest.raises(ValueError, match="K % 64"):
        prepare_weights(w, s, layout="950-mxfp4-nz")
    with pytest.raises(ValueError, match="unknown layout"):
        prepare_weights(w, s, layout="nz")
    with pytest.raises(ValueError, match="takes"):
        prepare_weights(w[0], s[0], layout="950-mxfp4-nz")
    assert set(LAYOUTS) == {"bf16-nd", "bf16-nz", "950-mxfp4-nz", "a2a3-w8a8-nz"}


def test_prepared_weight_passes_the_contract_and_the_composite_path(a2):
    from dsv4rt.ops import gemm as spec

    x, w, s, off = experts()
    pw = prepare_weights(w, s, soc="A2")
    spec.FP4_GROUPED_GEMM.check(dict(x=x, w=pw, w_scale=s, offsets=off, act_quant=None))
    assert pw.data_ptr() == w.data_ptr() and pw.dtype == w.dtype and pw.shape == w.shape
    assert torch.equal(a2.torch("fp4_grouped_gemm").fn(x, pw, s, off, None),
                       a2.torch("fp4_grouped_gemm").fn(x, w, s, off, None))
    assert type(pw[0]) is torch.Tensor and "bf16-nd" in repr(pw)


# ---------------------------------------------------------------------------------- fp4_gemm / fp8_gemm

@pytest.mark.parametrize("op", ["fp4_gemm", "fp8_gemm"])
@pytest.mark.parametrize("act_quant", [None, "fp8"])
def test_dense_gemm_on_prepared_bf16(a2, op, act_quant):
    g = gen(1)
    wf = torch.randn(96, 256, generator=g)
    w, s = quant_mxfp4(wf) if op == "fp4_gemm" else quant_fp8_block(wf)
    x = torch.randn(7, 256, generator=g).bfloat16()
    pw = prepare_weights(w, s)
    args = dict(x=x, w=pw, w_scale=s, act_quant=act_quant)
    assert a2.fused(op).supports(args) is None
    y = a2.fused(op).fn(x, pw, s, act_quant)
    assert a2.rec.calls == [] and y.dtype == torch.bfloat16
    check("gemm", op, dict(args, w=w), y)
    assert "prepare_weights" in a2.fused(op).supports(dict(args, w=w))
    assert "needs bfloat16 x" in a2.fused(op).supports(dict(args, x=x.float()))


@pytest.mark.parametrize("act_quant", [None, "fp8"])
def test_dense_fp8_block32_on_prepared_bf16(a2, act_quant):
    """V4.1's 32x32 FP8 blocks: prepared with block_size=32 they run fused (exactly); a weight prepared for
    the other block size is refused with the reason, and no quantised torch_npu matmul is called."""
    g = gen(11)
    wf = torch.randn(72, 160, generator=g) * torch.logspace(-3, 3, 160)   # scales differ per 32 columns
    w, s = quant_fp8_block(wf, 32)
    x = torch.randn(5, 160, generator=g).bfloat16()
    pw = prepare_weights(w, s, block_size=32)
    assert pw.prep.block == 32
    args = dict(x=x, w=pw, w_scale=s, act_quant=act_quant, block_size=32)
    assert a2.fused("fp8_gemm").supports(args) is None
    y = a2.fused("fp8_gemm").fn(x, pw, s, act_quant, 32)
    assert a2.rec.calls == [] and y.dtype == torch.bfloat16
    check("gemm", "fp8_gemm", dict(args, w=w), y)
    assert "block_size=32" in a2.fused("fp8_gemm").supports(dict(args, block_size=128))
    w128, s128 = quant_fp8_block(wf[:, :128])
    p128 = prepare_weights(w128, s128)
    reason = a2.fused("fp8_gemm").supports(dict(args, x=x[:, :128], w=p128, w_scale=s128))
    assert "prepared with block_size=128" in reason
    with pytest.raises(ValueError, match="block_size=32"):
        prepare_weights(w128, s128, block_size=32)
    with pytest.raises(ValueError, match="128 \\(V4\\) or 32"):
        prepare_weights(w, s, block_size=64)


@pytest.mark.parametrize("op", ["fp4_gemm", "fp8_gemm"])
def test_dense_gemm_block32_falls_back_on_raw_weight(a2, op):
    g = gen(12)
    wf = torch.randn(40, 96, generator=g)
    w, s = quant_mxfp4(wf) if op == "fp4_gemm" else quant_fp8_block(wf, 32)
    x = torch.randn(3, 96, generator=g).bfloat16()
    y = a2.fused(op).fn(x, w, s, "fp8", 32)
    assert a2.rec.calls == []
    assert torch.equal(y, a2.torch(op).fn(x, w, s, "fp8", 32))
    key = "block_size" if op == "fp8_gemm" else "act_block_size"
    check("gemm", op, {"x": x, "w": w, "w_scale": s, "act_quant": "fp8", key: 32}, y)


def test_dense_fp4_act_block32_on_prepared_bf16(a2):
    g = gen(13)
    w, s = quant_mxfp4(torch.randn(64, 288, generator=g))
    x = torch.randn(4, 288, generator=g).bfloat16()
    x[:, 0] = 2.0**20   # an outlier: 1x128 and 1x32 activation blocks then round the rest differently
    pw = prepare_weights(w, s)
    y = a2.fused("fp4_gemm").fn(x, pw, s, "fp8", 32)
    assert a2.rec.calls == []
    assert torch.equal(y, torch.matmul(
        dsv4rt_quantize(x, 32).bfloat16(), pw.prep.tensor.t()))
    assert not torch.equal(y, a2.fused("fp4_gemm").fn(x, pw, s, "fp8", 128))
    check("gemm", "fp4_gemm", {"x": x, "w": w, "w_scale": s, "act_quant": "fp8", "act_block_size": 32}, y)


def dsv4rt_quantize(x: torch.Tensor, block: int) -> torch.Tensor:
    from dsv4rt.backends.composite.gemm import quantize_activation

    return quantize_activation(x, "fp8", block)


@pytest.mark.parametrize("act_block", [32, 128])
def test_grouped_gemm_950_act_block32_is_exact_mxfp8(c950, act_block):
    """The 950 MxA8W4 path re-expresses q(x) as MXFP8 (1x32): exact for 1x32 activation blocks too."""
    x, w, s, off = experts()
    x[:, 0] = 2.0**18
    pw = prepare_weights(w, s, soc="950")
    args = dict(x=x, w=pw, w_scale=s, offsets=off, act_quant="fp8", act_block_size=act_block)
    assert c950.fused("fp4_grouped_gemm").supports(args) is None
    y = c950.fused("fp4_grouped_gemm").fn(x, pw, s, off, "fp8", act_block)
    assert torch.equal(y, c950.torch("fp4_grouped_gemm").fn(x, w, s, off, "fp8", act_block))
    check("gemm", "fp4_grouped_gemm", dict(args, w=w), y)


def test_fp8_with_float32_scales_needs_allow_lossy(a2):
    w, s = quant_fp8_block(torch.randn(128, 128, generator=gen(2)))
    s32 = s.to(torch.float32) if s.dtype == torch.float32 else torch.exp2(s.float() - 127)
    with pytest.raises(ValueError, match="allow_lossy"):
        prepare_weights(w, s32)
    assert prepare_weights(w, s32, allow_lossy=True).prep.exact is False


# ------------------------------------------------------------------------------- moe_dispatch / combine

@pytest.mark.parametrize("dtype,only,noncontig", [(torch.bfloat16, None, False), (torch.float32, 5, False),
                                                  (torch.float16, None, True)])
def test_dispatch_calls_init_routing_v2(a2, dtype, only, noncontig):
    g = gen(3)
    t, h, e, k = 11, 32, 8, 3
    x = torch.randn(t, 2 * h if noncontig else h, generator=g).to(dtype)
    x = x[:, ::2] if noncontig else x
    ids = (torch.full((t, k), only, dtype=torch.int32) if only is not None else
           torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(torch.int32))
    out = a2.fused("moe_dispatch").fn(x, ids, e)
    (call,) = a2.rec.named("npu_moe_init_routing_v2")
    assert call.args["x"] == desc(dtype, (t, h)) and call.args["expert_idx"] == desc(torch.int32, (t, k))
    assert {n: call.args[n] for n in ("active_num", "expert_num", "drop_pad_mode", "expert_tokens_num_type",
                                      "expert_tokens_num_flag", "quant_mode", "active_expert_range",
                                      "row_idx_type")} == {
        "active_num": t * k, "expert_num": e, "drop_pad_mode": 0, "expert_tokens_num_type": 0,
        "expert_tokens_num_flag": True, "quant_mode": -1, "active_expert_range": [0, e], "row_idx_type": 1}
    want = a2.torch("moe_dispatch").fn(x, ids, e)
    assert [o.dtype for o in out] == [dtype, torch.int32, torch.int32]
    assert all(torch.equal(a, b) for a, b in zip(out, want))            # bitwise: pure data movement


def test_dispatch_supports_and_empty(a2):
    sup = a2.fused("moe_dispatch").supports
    x, ids = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.int32)
    assert "float64" in sup(dict(x=x, ids=ids, num_experts=4))
    assert "10240" in sup(dict(x=x.float(), ids=ids, num_experts=10241))
    out = a2.fused("moe_dispatch").fn(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.int32), 4)
    assert a2.rec.calls == [] and out[1].tolist() == [0] * 5


def combine_case(t=9, h=24, k=3, dtype=torch.bfloat16, weighted=False):
    g = gen(4)
    src = torch.randperm(t * k, generator=g).to(torch.int32)
    y = torch.randn(t * k, h, generator=g).to(dtype)
    return y, src, (torch.rand(t, k, generator=g) if weighted else None), (None if weighted else k)


@pytest.mark.parametrize("soc", [A2, A3])
def test_combine_calls_token_unpermute_in_bf16_with_the_gather_index(monkeypatch, soc):
    env = load(monkeypatch, soc)
    y, src, w, k = combine_case()
    assert env.fused("moe_combine").supports(dict(y_sorted=y, src=src, weights=w, topk=k)) is None
    out = env.fused("moe_combine").fn(y, src, w, k)
    (call,) = env.rec.named("npu_moe_token_unpermute")
    assert call.args["permuted_tokens"] == desc(torch.bfloat16, (27, 24))      # documented: bfloat16 only
    assert call.args["sorted_indices"] == desc(torch.int32, (27,))
    assert call.args["probs"] == desc(torch.bfloat16, (9, 3))                   # ones: exact in bfloat16
    assert out.dtype == torch.bfloat16 and out.shape == (9, 24)
    check("combine", "moe_combine", dict(y_sorted=y, src=src, weights=w, topk=k), out)


@pytest.mark.parametrize("soc,dtype,weighted,expect", [
    (A2, torch.float32, False, "bfloat16 only"),
    (A3, torch.float16, False, "bfloat16 only"),
    (A2, torch.bfloat16, True, "float32 weights"),
    (C950, torch.bfloat16, False, "A2 and A3 only"),
])
def test_combine_declines_what_the_op_cannot_take_exactly(monkeypatch, soc, dtype, weighted, expect):
    """The op documents bf16 tokens / probs on A2 / A3: fp32 rows, fp32 route weights and the 950 run the
    composite combine (the stand-in raises as CANN would if the call were made)."""
    env = load(monkeypatch, soc)
    y, src, w, k = combine_case(dtype=dtype, weighted=weighted)
    args = dict(y_sorted=y, src=src, weights=w, topk=k)
    reason = env.fused("moe_combine").supports(args)
    assert reason and expect in reason, reason
    out = env.fused("moe_combine").fn(y, src, w, k)                # re-checks and falls back
    assert env.rec.named("npu_moe_token_unpermute") == []
    assert torch.equal(out, env.torch("moe_combine").fn(y, src, w, k))
    check("combine", "moe_combine", args, out)


def test_stand_in_unpermute_rejects_what_the_documentation_rejects(a2):
    y, src, _, _ = combine_case(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="bfloat16"):
        a2.fake.npu_moe_token_unpermute(y, src, probs=torch.ones(9, 3))


def test_combine_supports_topk_limit(a2):
    y = torch.zeros(513, 4, dtype=torch.bfloat16)
    assert "512" in a2.fused("moe_combine").supports(dict(y_sorted=y, src=None, weights=None, topk=513))


def test_unpermute_chips_match_the_docstring(release):
    from dsv4rt.backends.ascend.fake_schemas import load_facts
    from dsv4rt.backends.ascend.moe import UNPERMUTE_CHIPS

    assert load_facts(release).doc_chips["npu_moe_token_unpermute"] == UNPERMUTE_CHIPS


# ------------------------------------------------------------------------------------------ indexer_topk

def indexer_args(b=3, n=40, h=8, d=128, topk=16, dtype=torch.bfloat16, s=1):
    g = gen(5)
    return dict(q=torch.randn(b, s, h, d, generator=g).to(dtype), k=torch.randn(b, n, d, generator=g).to(dtype),
                weights=torch.rand(b, s, h, generator=g), visible=torch.tensor([[n], [7], [0]][:b] * s,
                                                                                dtype=torch.int32).reshape(b, s),
                topk=topk, k_scale=None, return_scores=False)


def test_indexer_decode_calls_lightning_indexer(a2):
    args = indexer_args()
    assert a2.fused("indexer_topk").supports(args) is None
    idx = a2.fused("indexer_topk").fn(*args.values())
    (call,) = a2.rec.named("npu_lightning_indexer")
    assert call.args["query"] == desc(torch.bfloat16, (3, 1, 8, 128))
    assert call.args["key"] == desc(torch.bfloat16, (3, 40, 1, 128))
    assert call.args["weights"] == desc(torch.float32, (3, 1, 8))
    assert call.args["actual_seq_lengths_key"] == desc(torch.int32, (3,))
    assert call.args["actual_seq_lengths_query"] is None
    assert (call.args["layout_query"], call.args["layout_key"], call.args["sparse_count"], call.args["sparse_mode"]) \
        == ("BSND", "BSND", 16, 3)
    assert idx.dtype == torch.int32 and idx.shape == (3, 1, 16)
    assert (idx[1, 0, 7:] == -1).all() and (idx[2] == -1).all()
    check("topk", "indexer_topk", args, idx)


@pytest.mark.parametrize("soc,change,expect", [
    (A2, dict(s=2), "S = 2"),
    (A2, dict(dtype=torch.float32), "float32"),
    (A2, dict(d=64), "D = 64"),
    (A2, dict(h=65), "H = 65"),
    (C950, dict(h=12), "H = 12"),
    (C950, dict(), "weights are float32"),
    (A2, dict(topk=2049), "sparse_count"),
    (A2, dict(topk=2500), "sparse_count"),
    (A2, dict(n=0), "no keys"),
])
def test_indexer_supports_refuses(monkeypatch, soc, change, expect):
    env = load(monkeypatch, soc)
    args = indexer_args(**change)
    reason = env.fused("indexer_topk").supports(args)
    assert reason and expect in reason, reason


def test_indexer_refuses_fp8_keys_and_scores(a2):
    args = indexer_args()
    sup = a2.fused("indexer_topk").supports
    assert "FP8" in sup(dict(args, k=args["k"].to(torch.float8_e4m3fn), k_scale=torch.ones(3, 40)))
    assert sup(dict(args, topk=4096)) is None


def test_indexer_return_scores_recomputed(a2):
    args = dict(indexer_args(), return_scores=True)
    assert a2.fused("indexer_topk").supports(args) is None
    idx, scores = a2.fused("indexer_topk").fn(*args.values())
    assert scores.dtype == torch.float32 and scores.shape == idx.shape
    assert torch.isinf(scores[idx < 0]).all()
    check("topk", "indexer_topk", args, (idx, scores))


def test_indexer_v41_sorted_output_maps(a2):
    """V4.1 without a candidate mask: 32 heads, FP4-simulated bf16 q / k (the caller's), rows sorted by key."""
    args = dict(indexer_args(h=32, topk=16), return_scores=True, score_dtype=None, candidates=None,
                sorted_output=True)
    assert a2.fused("indexer_topk").supports(args) is None
    idx, scores = a2.fused("indexer_topk").fn(*args.values())
    assert a2.rec.named("npu_lightning_indexer")
    for row in idx.reshape(-1, 16):
        valid = row[row >= 0]
        assert (row[:valid.numel()] >= 0).all() and (valid[1:] > valid[:-1]).all(), row
    check("topk", "indexer_topk", args, (idx, scores))


def test_indexer_v41_candidates_go_to_the_composite(a2):
    args = dict(indexer_args(h=32), score_dtype=None, candidates=torch.ones(3, 1, 40, dtype=torch.bool),
                sorted_output=True)
    reason = a2.fused("indexer_topk").supports(args)
    assert reason and "candidates" in reason and "no mask" in reason, reason
    assert a2.torch("indexer_topk").supports is None or a2.torch("indexer_topk").supports(args) is None
    idx = a2.torch("indexer_topk").fn(*args.values())
    check("topk", "indexer_topk", args, idx)


# -------------------------------------------------------------------------------------- sparse_attention

def decode_case(b_pos=(3, 20), w=8, h=70, d=64, ncomp=5):
    g = gen(6)
    n = w + ncomp
    q = torch.randn(len(b_pos), 1, h, d, generator=g).bfloat16()
    kv = torch.randn(len(b_pos), n, d, generator=g).bfloat16()
    win = torch.stack([torch.where(torch.arange(w) < min(p + 1, w), torch.arange(w), -1) for p in b_pos])
    comp = torch.stack([torch.where(torch.arange(ncomp) < 3, w + torch.arange(ncomp), -1) for _ in b_pos])
    idx = torch.cat([win, comp], -1).to(torch.int32)[:, None, :]
    return q, kv, idx, WindowedIndex.decode(idx, w, 0, [min(p + 1, w) for p in b_pos]), torch.randn(h, generator=g)


def prefill_case(s=12, w=8, h=70, d=64, ncomp=3, b=2):
    g = gen(7)
    n = w + s + ncomp
    q = torch.randn(b, s, h, d, generator=g).bfloat16()
    kv = torch.randn(b, n, d, generator=g).bfloat16()
    pos = torch.arange(s)
    qq = pos[:, None] - (w - 1) + torch.arange(w)[None, :]
    win = torch.where(qq < 0, -1, w + qq)
    comp = torch.where(torch.arange(ncomp)[None, :] < ((pos + 1) // 4)[:, None], w + s + torch.arange(ncomp)[None, :], -1)
    idx = torch.cat([win, comp], -1).to(torch.int32)[None].expand(b, s, w + ncomp).contiguous()
    return q, kv, idx, WindowedIndex.prefill(idx, w, w), torch.randn(h, generator=g)


@pytest.mark.parametrize("with_sink", [True, False])
def test_attention_decode_window_through_fia(a2, with_sink):
    q, kv, idx, widx, sink = decode_case()
    sink = sink if with_sink else None
    assert widx.verify()
    args = dict(q=q, kv=kv, idx=widx, sink=sink, scale=0.125, return_lse=True)
    assert a2.fused("sparse_attention").supports(args) is None
    o, lse = a2.fused("sparse_attention").fn(*args.values())
    calls = a2.rec.named("npu_fused_infer_attention_score")
    assert [c.args["num_heads"] for c in calls] == [64, 6]                 # GQA ratio <= 64: heads in chunks
    for c, heads in zip(calls, (64, 6)):
        assert c.args["query"] == desc(torch.bfloat16, (2, 1, heads, 64))
        assert c.args["key"] == c.args["value"] == desc(torch.bfloat16, (2, 8, 1, 64))
        assert c.args["actual_seq_lengths_kv"] == [4, 8]
        assert (c.args["input_layout"], c.args["num_key_value_heads"], c.args["softmax_lse_flag"], c.args["scale"]) \
            == ("BSND", 1, True, 0.125)
        assert c.args["atten_mask"] is None
    check("attention", "sparse_attention", dict(args, idx=idx), (o, lse))


def test_attention_prefill_band_through_fia(a2):
    q, kv, idx, widx, sink = prefill_case()
    assert widx.verify()
    args = dict(q=q, kv=kv, idx=widx, sink=sink, scale=0.125, return_lse=False)
    o = a2.fused("sparse_attention").fn(*args.values())
    c = a2.rec.named("npu_fused_infer_attention_score")[0]
    assert c.args["query"] == desc(torch.bfloat16, (2, 12, 64, 64))
    assert c.args["key"] == desc(torch.bfloat16, (2, 12, 1, 64))
    assert (c.args["sparse_mode"], c.args["pre_tokens"], c.args["next_tokens"]) == (4, 7, 0)
    assert c.args["atten_mask"] == desc(torch.bool, (2048, 2048))
    assert o.dtype == torch.bfloat16
    check("attention", "sparse_attention", dict(args, idx=idx), o)


def test_attention_window_only_layer(a2):
    q, kv, idx, _, sink = prefill_case(ncomp=0)
    widx = WindowedIndex.prefill(idx, 8, 8)
    o = a2.fused("sparse_attention").fn(q, kv, widx, sink, 0.125, False)
    check("attention", "sparse_attention", dict(q=q, kv=kv, idx=idx, sink=sink, scale=0.125, return_lse=False), o)


@pytest.mark.parametrize("case,expect", [
    ("plain", "WindowedIndex"), ("fp32", "float32"), ("kv-dtype", "kv is"), ("d", "D = 520"), ("h", "H = 300"),
    ("valid", "valid must"), ("prefill-rows", "outside"), ("decode-s2", "S = 1"), ("width", "window width"),
])
def test_attention_supports_refuses(a2, case, expect):
    q, kv, idx, widx, sink = decode_case()
    args = dict(q=q, kv=kv, idx=widx, sink=sink, scale=0.1, return_lse=False)
    if case == "plain":
        args["idx"] = idx
    elif case == "fp32":
        args.update(q=q.float(), kv=kv.float())
    elif case == "kv-dtype":
        args["kv"] = kv.half()
    elif case == "d":
        args.update(q=torch.empty(2, 1, 8, 520, dtype=torch.bfloat16), kv=torch.empty(2, 13, 520, dtype=torch.bfloat16))
    elif case == "h":
        args["q"] = torch.empty(2, 1, 300, 64, dtype=torch.bfloat16)
    elif case == "valid":
        args["idx"] = WindowedIndex.decode(idx, 8, 0, [0, 8])
    elif case == "prefill-rows":
        q2, kv2, idx2, _, _ = prefill_case()
        args.update(q=q2, kv=kv2, idx=WindowedIndex.prefill(idx2, 8, 20))
    elif case == "decode-s2":
        q2, kv2, idx2, _, _ = prefill_case()
        args.update(q=q2, kv=kv2, idx=WindowedIndex.decode(idx2, 8, 0, [8, 8]))
    elif case == "width":
        args["idx"] = WindowedIndex.decode(idx, 99, 0, [4, 8])
    reason = a2.fused("sparse_attention").supports(args)
    assert reason and expect in reason, reason


def test_attention_plain_idx_falls_back(a2):
    q, kv, idx, _, sink = decode_case()
    o = a2.fused("sparse_attention").fn(q, kv, idx, sink, 0.1, False)
    assert a2.rec.calls == []
    assert torch.equal(o, a2.torch("sparse_attention").fn(q, kv, idx, sink, 0.1, False))


def test_attention_v41_packed_cache_declined_with_reason_and_run_by_composite(a2):
    from dsv4rt.formats import pack_kv_fp4, pack_kv_fp8
    q, kv, idx, widx, sink = decode_case(d=64)
    kvb, glob = pack_kv_fp8(kv[:, :8]), pack_kv_fp4(kv[:, 8:])        # 8 window rows, 5 global rows
    args = dict(q=q, kv=kvb, idx=widx, sink=sink, scale=0.125, return_lse=True, p_dtype=None, kv_format="v41",
                kv_global=glob)
    reason = a2.fused("sparse_attention").supports(args)
    assert reason and "kv_format='v41'" in reason and "torch_npu" in reason, reason
    o, lse = a2.fused("sparse_attention").fn(*args.values())             # falls back to the composite code
    assert a2.rec.named("npu_fused_infer_attention_score") == []
    plain = dict(args, idx=idx)
    assert a2.torch("sparse_attention").supports is None or a2.torch("sparse_attention").supports(plain) is None
    o2, lse2 = a2.torch("sparse_attention").fn(*plain.values())
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    check("attention", "sparse_attention", plain, (o, lse))


def test_windowed_index_verify_catches_a_wrong_declaration():
    _, _, idx, _, _ = decode_case()
    assert not WindowedIndex.decode(idx, 8, 0, [8, 8]).verify()
    assert not WindowedIndex.decode(idx, 8, 1, [4, 8]).verify()


# ------------------------------------------------------------------------------ real-release schema facts

def test_facts_hold_every_op_the_backend_calls_and_the_real_dtype_constants(release):
    from dsv4rt.backends.ascend._npu import OPS
    from dsv4rt.backends.ascend.fake_schemas import load_facts

    facts = load_facts(release)
    assert facts.wheel.startswith(f"torch_npu-{facts.version}-")
    assert set(OPS) <= facts.ops()
    assert {k: facts.dtypes[k] for k in C} == C == {
        "float4_e2m1fn_x2": 296, "float4_e1m2fn_x2": 297, "float8_e8m0fnu": 293, "float8_e4m3fn": 292,
        "float8_e5m2": 291, "hifloat8": 290, "int4": 285}


def test_schema_binding_rejects_drift(a2):
    """The bound ops enforce the release's signatures: keyword-only arguments, names, types."""
    x = torch.zeros(4, 4, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="positional"):
        a2.fake.npu_format_cast(x, 29, torch.float8_e4m3fn)               # customize_dtype is keyword-only
    with pytest.raises(RuntimeError, match="Unknown keyword"):
        a2.fake.npu_format_cast(x, 29, customise_dtype=1)
    with pytest.raises(RuntimeError):
        a2.fake.npu_lightning_indexer(x, x, x, sparse_count="16")          # int argument given a str
    with pytest.raises(RuntimeError, match="Unknown keyword"):
        a2.fake.npu_grouped_matmul([x], [x], group_list_types=0)


def test_gmm_dtype_table_matches_the_meta_registration(release):
    from dsv4rt.backends.ascend.fake_schemas import load_facts
    from dsv4rt.backends.ascend.gemm import GMM_DTYPE_ARGS

    assert {k: tuple(v) for k, v in load_facts(release).gmm_meta.items()} == GMM_DTYPE_ARGS


def test_gmm_graph_mode_rejects_x_dtype_e4m3(c950):
    """What the 950 call passed before: x_dtype=float8_e4m3fn, which graph capture (meta) rejects."""
    from dsv4rt.backends.ascend.gemm import gmm_dtype_reason

    x = torch.zeros(4, 64, dtype=torch.float8_e4m3fn)
    w = torch.zeros(1, 32, 8, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="x_dtype"):
        c950.fake.npu_grouped_matmul([x], [w], group_list=torch.tensor([4]), split_item=3, group_type=0,
                                     x_dtype=C["float8_e4m3fn"], weight_dtype=C["float4_e2m1fn_x2"])
    reason = gmm_dtype_reason(c950.fake, {"x_dtype": "float8_e4m3fn"})
    assert reason and "graph-mode" in reason
    assert gmm_dtype_reason(c950.fake, {"weight_dtype": "float4_e2m1fn_x2"}) is None


@pytest.mark.parametrize("soc,wdtype,qdtype", [(A2, torch.float16, torch.bfloat16), (C950, torch.float16,
                                                                                       torch.bfloat16)])
def test_indexer_weights_must_be_in_the_query_dtype(monkeypatch, soc, wdtype, qdtype):
    env = load(monkeypatch, soc)
    args = dict(indexer_args(h=8, dtype=qdtype), weights=torch.rand(3, 1, 8).to(wdtype))
    reason = env.fused("indexer_topk").supports(args)
    assert reason and "query's dtype" in reason, reason
    ok = dict(args, weights=args["weights"].to(qdtype))
    assert env.fused("indexer_topk").supports(ok) is None
    idx = env.fused("indexer_topk").fn(*ok.values())
    (call,) = env.rec.named("npu_lightning_indexer")
    assert call.args["weights"] == desc(qdtype, (3, 1, 8))
    check("topk", "indexer_topk", ok, idx)


# --------------------------------------------------------------------- V4.1 modes: declined with reasons

def test_v41_composite_only_ops_have_no_fused_variant(a2):
    """indexer_scores, kv_compress, moe_route and the Engram ops have no torch_npu fused variant (no torch_npu
    op computes them; reasons in the module docs): ascend/torch, and ascend/triton where triton-ascend runs."""
    offers = a2.backend.offers()
    for op in ("indexer_scores", "kv_compress", "moe_route", "engram_hash", "engram_lookup"):
        assert (op, "fused") not in a2.impls and (op, "torch") in a2.impls
        assert offers[op] == ("triton", "torch")


def test_v41_mxfp4_indexer_keys_declined(a2):
    from dsv4rt.formats import quant_mxfp4

    args = indexer_args(h=32)
    kq, ks = quant_mxfp4(args["k"].float())
    reason = a2.fused("indexer_topk").supports(dict(args, k=kq, k_scale=ks))
    assert reason and "MXFP4" in reason, reason
