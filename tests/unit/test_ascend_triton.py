"""WIRING tests of ``ascend/triton`` (backends/ascend/triton_npu.py) with the torch_npu stand-in.

They prove that the ascend backend registers the CUDA backend's Triton launchers for NPU tensors, between
``ascend/fused`` and ``ascend/torch``, and that each call declines with the reason where triton-ascend
cannot run (not installed, or community Triton installed instead) and otherwise asks the launcher's own
supports(). No kernel runs on an NPU here (none is available; the binary stage needs CANN).
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from dsv4rt.backend import Registrar
from dsv4rt.backends import ascend
from dsv4rt.backends.ascend import AscendBackend, fake_torch_npu, triton_npu
from dsv4rt.backends.cuda import TRITON_FAMILIES
from dsv4rt.registry import REGISTRY


def load(monkeypatch, versions: dict[str, str | None] | None = None) -> SimpleNamespace:
    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu.make(223))
    if versions is not None:
        monkeypatch.setattr(triton_npu, "_dist_version", lambda name: versions.get(name))
    backend = AscendBackend()
    registrar = Registrar(backend, REGISTRY.specs)
    backend.load(registrar)
    impls = {(i.op, i.variant): i for i in registrar.implementations}
    return SimpleNamespace(impls=impls, caps=registrar.capabilities, backend=backend)


def cuda_launchers() -> dict[str, object]:
    out = {}

    class Collect:
        def implement(self, op, variant, fn, **kw):
            out[op] = (fn, kw.get("supports"))

    for family in TRITON_FAMILIES:
        importlib.import_module(f"dsv4rt.backends.cuda.{family}").register(Collect(), device_type="npu", priority=0)
    return out


def test_every_triton_launcher_is_registered_for_npu_between_fused_and_torch(monkeypatch):
    env = load(monkeypatch, {"triton-ascend": "3.2.0", "triton": None})
    launchers = cuda_launchers()
    assert set(launchers) == set(triton_npu.triton_ops()) == set(ascend._TRITON_OPS)
    for op, (fn, _) in launchers.items():
        impl = env.impls[(op, "triton")]
        assert impl.fn is fn and impl.device_type == "npu"
        assert ascend.COMPOSITE_PRIORITY < impl.priority == triton_npu.TRITON_PRIORITY < ascend.FUSED_PRIORITY
        assert "triton" in env.backend.offers()[op]
    assert env.caps["triton_ascend"] == "3.2.0" and env.caps["triton_ascend_reason"] == "available"


@pytest.mark.parametrize("versions,expect", [
    ({"triton-ascend": None, "triton": "3.9.0"}, "community Triton"),
    ({"triton-ascend": None, "triton": None}, "triton-ascend is not installed"),
])
def test_declines_with_the_reason_without_triton_ascend(monkeypatch, versions, expect):
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if (name == "triton" and versions["triton"]) else None)
    env = load(monkeypatch, versions)
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    reason = env.impls[("moe_route", "triton")].supports(
        {"logits": x.float(), "bias": None, "topk": 2, "route_scale": 1.0})
    assert reason and reason.startswith("ascend/triton: ") and expect in reason, reason
    assert env.caps["triton_ascend"] is False and expect in env.caps["triton_ascend_reason"]


def test_with_triton_ascend_the_launchers_own_supports_decides(monkeypatch):
    env = load(monkeypatch, {"triton-ascend": "3.2.0", "triton": None})
    launchers = cuda_launchers()
    impl = env.impls[("moe_route", "triton")]
    _, own = launchers["moe_route"]
    for args in ({"logits": torch.zeros(3, 16), "bias": None, "topk": 2, "route_scale": 1.5},
                 {"logits": torch.zeros(3, 2048), "bias": None, "topk": 2, "route_scale": 1.5}):
        want = own(args) if own is not None else None
        assert impl.supports(args) == want
    assert impl.supports({"logits": torch.zeros(3, 2048), "bias": None, "topk": 2, "route_scale": 1.5})


def test_unavailable_without_torch_npu(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    assert "torch_npu is not imported" in triton_npu.unavailable()


# --- the launchers on NPU tensors: the device build, its tiles and Ascend's dot precision ---------------------

_Device = collections.namedtuple("_Device", "type index")   # hashable, like torch.device (cached per device)
NPU = _Device("npu", 0)


class _OnNpu(torch.Tensor):
    """A CPU tensor reporting an Ascend device: torch_npu (and so a real "npu" tensor) is not installed here,
    and the launchers' planning reads only the device and the shapes."""

    @property
    def device(self):  # type: ignore[override]
        return NPU


def on_npu(t: torch.Tensor) -> torch.Tensor:
    return torch.Tensor._make_subclass(_OnNpu, t)


@pytest.fixture
def npu_cores(monkeypatch):
    """torch.npu as torch_npu provides it, for the core count (cube cores) the launchers size grids with."""
    props = SimpleNamespace(cube_core_num=24, vector_core_num=48)
    current = []

    @contextlib.contextmanager
    def device(d):   # torch_npu's torch.npu.device: the device current within the block
        current.append(d)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch, "npu", SimpleNamespace(get_device_properties=lambda d: props, device=device,
                                                      current=current), raising=False)
    monkeypatch.delenv("DSV4RT_TRITON_INTERPRET", raising=False)
    return props.cube_core_num


def test_npu_tensors_are_launched_as_a_device_not_under_the_interpreter(npu_cores):
    from dsv4rt.backends.cuda import _launch, attention, engram, indexer, moe

    x = torch.zeros(2, 8)
    for mod in (_launch, attention, engram, indexer, moe):
        assert mod.on_interpreter(x) is True and mod.on_interpreter(on_npu(x)) is False, mod.__name__
    assert _launch.dot_precision(on_npu(x)) == "hf32" and _launch.dot_precision(x) == "tf32"
    assert _launch.core_count(NPU) == npu_cores
    other = on_npu(x)
    with _launch.device_guard(other):   # a launch makes its tensors' NPU current (not the first NPU's)
        assert torch.npu.current == [NPU]
    assert torch.npu.current == []


def test_sparse_attention_on_npu_gets_the_device_plan(npu_cores, monkeypatch):
    from dsv4rt.backends.cuda import attention

    for d, kv_format in ((512, None), (512, "v41"), (64, None)):
        q = torch.zeros(1, 1, 16, d, dtype=torch.bfloat16)
        args = {"q": q, "idx": torch.zeros(1, 1, 512, dtype=torch.int32), "kv_format": kv_format}
        interp = attention.plan(args)
        npu = attention.plan(dict(args, q=on_npu(q)))
        with monkeypatch.context() as m:   # the plan a device with npu_cores multiprocessors gets
            m.setattr(attention, "on_interpreter", lambda t: False)
            m.setattr(attention, "_sm_count", lambda dev: npu_cores)
            device = attention.plan(args)
        assert npu == device != interp, (d, kv_format, npu, interp)


def test_gemm_on_npu_gets_device_tiles_and_hf32(npu_cores):
    from dsv4rt.backends.cuda import gemm

    w = torch.zeros(256, 512, dtype=torch.uint8)
    for rows in (4, 64):   # the weight-streaming split-K path and the tiled path
        x = torch.zeros(rows, 512)
        p = gemm.plan("fp8_gemm", {"x": on_npu(x), "w": w, "act_quant": None})
        assert p.dot == "tf32" and p.num_stages > 1, p          # fp32 operands; device stages (interpreter: 1)
        meta = gemm._meta(512, p, on_npu(x))
        assert meta["DOT_PREC"] == "hf32" and meta["INTERP"] is False
        assert gemm._meta(512, p, x)["DOT_PREC"] == "tf32"     # NVIDIA and the interpreter: unchanged
        assert gemm.supports_fp8({"x": on_npu(x)}) is None      # triton_npu's gate decides, not "needs CUDA"


_GATHER_SCRIPT = r"""
import torch
from dsv4rt.backends.cuda import enable_interpreter
enable_interpreter()
from dsv4rt.backends.cuda import attention as A, _launch
from dsv4rt.conformance.runner import cases_for
from dsv4rt.registry import REGISTRY

seen = []
real = _launch.kernels("attention").sparse_attn_kernel
class Spy:
    def __getitem__(self, grid):
        def launch(*args, **kw):
            seen.append(kw["MASKED_GATHER"])
            return real[grid](*args, **kw)
        return launch
_launch.kernels("attention").sparse_attn_kernel = Spy()
def bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16) if t.dtype.is_floating_point else t
n = 0
for case in cases_for(REGISTRY.specs["sparse_attention"]):
    if case.raises is not None or "v41" not in case.id:
        continue
    args = case.inputs(0)
    outs = []
    for masked in (False, True):
        A.on_ascend = lambda t, masked=masked: masked    # the Ascend spelling of the gather, interpreter tiles
        out = A.sparse_attention(**args)
        outs.append(out if isinstance(out, tuple) else (out,))
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(*outs)), case.id
    n += 1
assert n >= 8 and set(seen) == {False, True}, (n, seen)
print("OK", n)
"""


def test_v41_rows_masked_gather_gives_the_bits_of_the_pointer_select():
    """The V4.1 rows' gather as Ascend compiles it (two masked loads) against NVIDIA's (a load through a
    select of pointers), under the interpreter on every V4.1 conformance case: bit for bit."""
    pytest.importorskip("triton", reason="Triton is not installed: the V4.1 gather spellings are not compared")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSV4RT_", "TRITON_"))}
    proc = subprocess.run([sys.executable, "-c", _GATHER_SCRIPT], capture_output=True, text=True, timeout=900,
                          env=dict(env, DSV4RT_TRITON_INTERPRET="1"))
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stderr[-3000:]
