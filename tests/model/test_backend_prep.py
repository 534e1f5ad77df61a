"""The model hands its GEMM weights (``Backend.prepare_weight``, via ``dsv4rt.prepare``) and its attention
windows (``dsv4rt.ops.attention.WindowedIndex``) to the backends, backend-neutrally.

On CPU the cpu backend packs MXFP4 experts in place for cpu/native (where its kernels run; other weights
stay the tensors read), and the window declaration leaves every result bit-identical. With the recording torch_npu
stand-in (``backends/ascend/fake_torch_npu.py``) and the Ascend backend registered for CPU tensors, a tiny
model run selects the ``ascend/fused`` GEMMs and attention instead of the composite fallback. That is a
WIRING check: nothing here ran on an NPU.
"""
from __future__ import annotations

import logging
import sys

import pytest
import torch

import dsv4rt
from dsv4rt import env
from dsv4rt.backend import Backend, Probe
from dsv4rt.model.transformer import Transformer
from dsv4rt.ops.attention import WindowedIndex
from dsv4rt.prepare import preparing_backend, weight_preparer
from dsv4rt.registry import REGISTRY

GEMMS = ("fp8_gemm", "fp4_gemm", "fp4_grouped_gemm")
A2, C950 = 223, 260


def _toks(n: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (batch, n), generator=torch.Generator().manual_seed(seed))


def _gemm_weights(model) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(op, w, w_scale) of every GEMM weight the model calls with."""
    from dsv4rt.model.weights import Experts, Fp8Linear

    out, seen = [], set()

    def walk(obj, depth=0):
        if id(obj) in seen or depth > 6:
            return
        seen.add(id(obj))
        if isinstance(obj, Fp8Linear):
            out.extend(("fp8_gemm", w, s) for w, s, _ in obj.groups)
        elif isinstance(obj, Experts):
            if obj.kind == "fp4":
                out.extend([("fp4_grouped_gemm", obj.w13, obj.s13), ("fp4_grouped_gemm", obj.w2, obj.s2)])
            for lin in (obj.fp8_13 or []) + (obj.fp8_2 or []):
                walk(lin, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth + 1)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, torch.Tensor):
            for v in vars(obj).values():
                walk(v, depth + 1)

    walk(model.layers)
    return out


# ------------------------------------------------------------------------------------------------- CPU


class _Recording(Backend):
    """A CPU backend whose weight hook records what it is handed and returns it unchanged."""

    name, device_type = "prep_recorder", "cpu"

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int, int]] = []

    def probe(self) -> Probe:
        return Probe(True, "test backend")

    def load(self, registrar) -> None:
        pass

    def prepare_weight(self, op, w, w_scale, block_size=128):
        self.seen.append((op, id(w), id(w_scale), block_size))
        return w


def test_on_cpu_only_the_cpu_backend_prepares_and_only_mxfp4(fresh_registry):
    cpu = REGISTRY.backends()["cpu"]
    assert all(preparing_backend(op, "cpu") is cpu for op in GEMMS)
    w, s = torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8)
    assert cpu.prepare_weight("fp8_gemm", w, s) is w
    assert cpu.prepare_weight("fp4_gemm", w, s) is w                  # N % 16 != 0: cannot be packed
    for name, b in REGISTRY.backends().items():
        if b.device_type == "cuda":
            assert b.prepare_weight("fp4_gemm", w, s) is w, name
    with dsv4rt.use_backend("cpu/numpy"):                               # the layout is for cpu/native only
        assert preparing_backend("fp4_grouped_gemm", "cpu") is None


def test_cpu_model_load_packs_only_the_mxfp4_experts(fresh_registry, tiny_ckpt):
    from dsv4rt.backends.cpu.packed import PackedMXFP4

    try:
        from dsv4rt import _C
        fast = _C.fp4_packed_fast()
    except ImportError:
        fast = False
    model = Transformer(tiny_ckpt.cfg, tiny_ckpt)
    weights = _gemm_weights(model)
    assert {op for op, _, _ in weights} == {"fp8_gemm", "fp4_grouped_gemm"}
    assert all(type(w) is torch.Tensor for op, w, _ in weights if op == "fp8_gemm")
    want = PackedMXFP4 if fast else torch.Tensor
    assert all(type(w) is want for op, w, _ in weights if op == "fp4_grouped_gemm")


def test_packed_experts_leave_cpu_results_bit_identical(fresh_registry, tiny_ckpt, monkeypatch):
    toks = _toks(12)

    def run():
        model = Transformer(tiny_ckpt.cfg, tiny_ckpt)
        cache = model.new_cache(2, 64)
        out = [model.forward(toks[:, :8], cache)]
        out += [model.forward(toks[:, i:i + 1], cache) for i in range(8, 12)]
        return torch.stack(out)

    packed = run()
    monkeypatch.setenv("DSV4RT_CPU_PACK_FP4", "0")
    env.refresh()
    assert torch.equal(packed, run())


@pytest.mark.parametrize("preset", ["tiny", "tiny-v41"])
def test_hook_sees_every_gemm_weight_once_and_its_result_is_used(fresh_registry, tmp_path_factory, preset):
    from dsv4rt.model.checkpoint import Checkpoint
    from dsv4rt.model.synthetic import tiny_checkpoint

    ck = Checkpoint(tiny_checkpoint(root=str(tmp_path_factory.mktemp("prep")), name=preset))
    rec = _Recording()
    REGISTRY.add_backend(rec)
    with dsv4rt.use_backend("prep_recorder"):
        assert preparing_backend("fp8_gemm", "cpu") is rec
        model = Transformer(ck.cfg, ck)
    weights = _gemm_weights(model)
    got = sorted((op, id(w), id(s)) for op, w, s in weights)
    assert sorted((op, w, s) for op, w, s, _ in rec.seen) == got      # each weight once, the same objects kept
    assert {blk for *_, blk in rec.seen} == {ck.cfg.fp8_block}


def test_the_asked_backend_follows_the_selection_rules(fresh_registry):
    rec = _Recording()
    REGISTRY.add_backend(rec)
    cpu = REGISTRY.backends()["cpu"]
    assert preparing_backend("fp8_gemm", "cpu") is cpu                  # automatic: the device's first preparer
    assert preparing_backend("fp8_gemm", "cuda") is None                # the cuda backends keep the default
    with dsv4rt.use_backend("prep_recorder"):                           # explicit
        assert preparing_backend("fp8_gemm", "cpu") is rec
    with dsv4rt.use_backend({"fp4_grouped_gemm": "cpu/numpy", "fp8_gemm": "prep_recorder"}):   # per op
        assert preparing_backend("fp4_grouped_gemm", "cpu") is None     # a variant cpu does not prepare for
        assert preparing_backend("fp8_gemm", "cpu") is rec
    for order, expect in (("cpu,prep_recorder", cpu), ("prep_recorder,cpu", rec)):
        fresh_registry.setenv("DSV4RT_BACKEND", order)
        dsv4rt.refresh()
        assert preparing_backend("fp8_gemm", "cpu") is expect, order


def test_window_declaration_leaves_cpu_results_bit_identical(tiny_ckpt, monkeypatch):
    import dsv4rt.model.attention as attention

    model = Transformer(tiny_ckpt.cfg, tiny_ckpt)
    toks = _toks(14)

    def run():
        cache = model.new_cache(2, 64)
        out = [model.forward(toks[:, :10], cache)]
        out += [model.forward(toks[:, i:i + 1], cache) for i in range(10, 14)]
        return torch.stack(out)

    declared = run()
    monkeypatch.setattr(attention, "declare_window", lambda idx, p0, s, w: idx)
    assert torch.equal(declared, run())


def test_declared_windows_are_true(tiny_ckpt, monkeypatch):
    """Every declaration the model makes matches its idx (prefill from 0, chunks, decode past the ring's wrap)."""
    from dsv4rt.model.opcall import OpCaller

    model = Transformer(tiny_ckpt.cfg, tiny_ckpt, dtype=torch.float32, quant=False)
    seen: list[tuple[int, bool]] = []
    real = OpCaller.sparse_attention

    def spy(self, q, kv, idx, sink, scale):
        if isinstance(idx, WindowedIndex):
            assert idx.verify(), idx.window
        seen.append((q.shape[1], isinstance(idx, WindowedIndex)))
        return real(self, q, kv, idx, sink, scale)

    monkeypatch.setattr(OpCaller, "sparse_attention", spy)
    w = tiny_ckpt.cfg.window_size
    toks = _toks(w + 8)
    cache = model.new_cache(2, 2 * w)
    model.forward(toks[:, :5], cache)
    model.forward(toks[:, 5:w + 3], cache)                # a chunk from p0 > 0: not declared
    for i in range(w + 3, w + 8):                         # decode past the window's wrap
        model.forward(toks[:, i:i + 1], cache)
    n = tiny_ckpt.cfg.n_layers
    assert seen == [(5, True)] * n + [(w - 2, False)] * n + [(1, True)] * (5 * n)


# ---------------------------------------------------------------------------------- the NPU stand-in


@pytest.fixture
def fake_npu(fresh_registry):
    """The Ascend backend over the torch_npu stand-in, registered for CPU tensors: ``fake_npu(soc)``."""
    from dsv4rt.backends.ascend import AscendBackend, fake_torch_npu

    class CpuAscend(AscendBackend):
        device_type = "cpu"

    def make(soc: int):
        fake = fake_torch_npu.make(soc)
        fresh_registry.setitem(sys.modules, "torch_npu", fake)
        REGISTRY.add_backend(CpuAscend(), replace=True)
        return fake

    return make


CASES = [("tiny", A2, True), ("tiny", C950, True), ("tiny-v41", A2, True), ("tiny-v41", A2, False)]


@pytest.mark.parametrize("preset,soc,quant", CASES, ids=[f"{p}-{s}-{'q' if q else 'noq'}" for p, s, q in CASES])
def test_fake_npu_run_selects_the_fused_variants(fake_npu, tmp_path_factory, caplog, preset, soc, quant):
    from dsv4rt.backends.ascend.weights import PreparedWeight
    from dsv4rt.model.checkpoint import Checkpoint
    from dsv4rt.model.synthetic import tiny_checkpoint

    fake = fake_npu(soc)
    ck = Checkpoint(tiny_checkpoint(root=str(tmp_path_factory.mktemp("prep")), name=preset))
    caplog.set_level(logging.INFO, logger="dsv4rt")
    with dsv4rt.use_backend("ascend"), env.override("DSV4RT_ASCEND_BF16_EXPERTS", "1"):
        model = Transformer(ck.cfg, ck, quant=quant)
        toks = _toks(12)
        cache = model.new_cache(2, 64)
        model.forward(toks[:, :10], cache)
        for i in range(10, 12):
            model.forward(toks[:, i:i + 1], cache)
    weights = _gemm_weights(model)
    assert weights and all(isinstance(w, PreparedWeight) for _, w, _ in weights)
    used = model.ops.used()
    assert used["fp8_gemm"].keys() == {"ascend/fused"}
    assert used["fp4_grouped_gemm"].keys() == {"ascend/fused"}
    packed_kv = preset == "tiny-v41" and quant            # V4.1's packed cache: no torch_npu op (declined)
    assert used["sparse_attention"].keys() == {"ascend/torch" if packed_kv else "ascend/fused"}
    fallbacks = [r.getMessage() for r in caplog.records if "-> composite" in r.getMessage()
                 and any(op in r.getMessage() for op in (*GEMMS, "sparse_attention"))]
    assert not fallbacks, fallbacks[:3]
    called = {c.op for c in fake.recorder.calls}
    assert "npu_grouped_matmul" in called
    assert ("npu_fused_infer_attention_score" in called) != packed_kv

    # the explain record of one call on a model weight, and of the same call on the released weight
    op, w, s = next(x for x in weights if x[0] == "fp8_gemm")
    x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    extra = ("fp8" if quant else None,) + ((ck.cfg.fp8_block,) if ck.cfg.fp8_block != 128 else ())
    with dsv4rt.use_backend("ascend"):
        assert dsv4rt.ops.fp8_gemm.explain(x, w, s, *extra).impl.name == "ascend/fused"
        raw = dsv4rt.ops.fp8_gemm.explain(x, w.as_subclass(torch.Tensor), s, *extra)
    assert raw.impl.name == "ascend/torch"
    assert any(n == "ascend/fused" and "prepare_weights" in r for n, r in raw.rejected)


@pytest.mark.parametrize("soc,experts_fused", [(A2, False), (C950, True)], ids=["A2", "950"])
def test_fake_npu_experts_stay_released_on_a2a3_by_default(fake_npu, tmp_path_factory, caplog, soc, experts_fused):
    """Without DSV4RT_ASCEND_BF16_EXPERTS an A2/A3 keeps the MXFP4 experts as released (a BF16 copy would
    be 4x their bytes) and runs them composite, saying why; the FP8 linears are still prepared. A 950 takes
    MXFP4 natively and prepares them either way."""
    from dsv4rt.backends.ascend.weights import PreparedWeight
    from dsv4rt.model.checkpoint import Checkpoint
    from dsv4rt.model.synthetic import tiny_checkpoint

    fake_npu(soc)
    ck = Checkpoint(tiny_checkpoint(root=str(tmp_path_factory.mktemp("prep")), name="tiny"))
    caplog.set_level(logging.INFO, logger="dsv4rt")
    with dsv4rt.use_backend("ascend"), env.override("DSV4RT_ASCEND_BF16_EXPERTS", "0"):
        model = Transformer(ck.cfg, ck)
        toks = _toks(6)
        model.forward(toks[:, :6], model.new_cache(2, 64))
    weights = _gemm_weights(model)
    experts = [w for op, w, _ in weights if op == "fp4_grouped_gemm"]
    dense = [w for op, w, _ in weights if op == "fp8_gemm"]
    assert experts and dense and all(isinstance(w, PreparedWeight) for w in dense)
    assert all(isinstance(w, PreparedWeight) == experts_fused for w in experts)
    used = model.ops.used()
    assert used["fp4_grouped_gemm"].keys() == {"ascend/fused" if experts_fused else "ascend/torch"}
    said = [r.getMessage() for r in caplog.records if "DSV4RT_ASCEND_BF16_EXPERTS" in r.getMessage()]
    assert bool(said) != experts_fused


def test_op_caller_binds_a_declared_index_apart_from_a_plain_one(monkeypatch):
    """The model's bound-call cache tells a WindowedIndex (or PreparedWeight) from a plain tensor of the same
    shape: a backend's supports() may accept one and refuse the other, so each gets its own selection."""
    from dsv4rt.model.opcall import OpCaller

    binds = []
    monkeypatch.setattr(OpCaller, "_bind", lambda self, name, args: binds.append(type(args[0])) or (lambda *a: None,
                                                                                                   "stub"))
    oc = OpCaller()
    idx = torch.arange(12, dtype=torch.int32).reshape(1, 3, 4)
    oc.call("sparse_attention", idx)
    oc.call("sparse_attention", WindowedIndex.decode(idx, 2, 0, [2, 2, 2]))
    oc.call("sparse_attention", idx)
    assert binds == [torch.Tensor, WindowedIndex]
