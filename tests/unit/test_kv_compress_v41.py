"""kv_compress in DeepSeek-V4.1's modes on every variant: CSA2 (ratio 2, no overlap, no ape, C = d) and
ratio 1 (no gate: the entries are the projected rows themselves, RMSNorm being model glue).

The decode-state tests drive the op the way a V4.1 compressor does (the official ``Compressor.forward``;
dsv4rt's ``runtime/model/compressor.py`` does the same for V4): fp32 ``kv_state`` / ``score_state``
[B, ratio, d] hold the rows of the incomplete group, the op runs on complete groups only, an entry is
emitted when ``(pos + 1) % ratio == 0`` and a prefill's trailing ``S % ratio`` rows wait in the state.
Chunked prefill followed by one-token decode must give the entries of one pass over the whole sequence.
The cuda/triton variant runs the same checks under Triton's interpreter in a subprocess.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import dsv4rt
import dsv4rt.reference as ref
from dsv4rt.backend import poisoned_outputs
from dsv4rt.conformance import tolerance as tol
from dsv4rt.errors import ContractError
from dsv4rt.registry import REGISTRY

F64 = torch.float64


def _cpu_variants() -> list[str]:
    names = [impl.name for impl in REGISTRY.implementations("kv_compress", "cpu")]
    assert {"cpu/torch", "cpu/numpy"} <= set(names), names
    return sorted(names)


class Csa2State:
    """A V4.1 compressor's decode state around the stateless op: fp32 ``kv_state`` / ``score_state``
    [B, ratio, d] holding ``n`` rows of the incomplete group."""

    def __init__(self, b: int, ratio: int, d: int, variant: str) -> None:
        self.ratio, self.variant, self.n = ratio, variant, 0
        self.kv_state = torch.zeros(b, ratio, d, dtype=torch.float32)
        self.score_state = torch.full((b, ratio, d), float("-inf"), dtype=torch.float32)

    def feed(self, kv: torch.Tensor, score: torch.Tensor | None) -> torch.Tensor:
        """Rows of the next positions -> the entries their groups complete ([B, n_complete, d] float32)."""
        r = self.ratio
        kv = torch.cat([self.kv_state[:, :self.n], kv], dim=1)
        if score is not None:
            score = torch.cat([self.score_state[:, :self.n], score], dim=1)
        full = kv.shape[1] // r * r
        with poisoned_outputs():
            out = dsv4rt.ops.kv_compress(kv[:, :full], None if score is None else score[:, :full], None, r, False,
                                         backend=self.variant)
        self.n = kv.shape[1] - full
        self.kv_state[:, :self.n] = kv[:, full:]
        if score is not None:
            self.score_state[:, :self.n] = score[:, full:]
        return out


def chunked_vs_one_pass(variant: str, ratio: int, gated: bool, chunks: list[int], seed: int) -> None:
    """Prefill in ``chunks`` then decode token by token: the same entries as one pass, each emitted at the
    position that completes its group, and within the pooling tolerance of the float64 reference."""
    g = torch.Generator().manual_seed(seed)
    b, d, total = 2, 40, sum(chunks) + 5
    kv = torch.randn(b, total, d, generator=g) * 2
    score = torch.randn(b, total, d, generator=g) * 3 if gated else None
    if gated and ratio > 1:
        score[0, 3, :7] = float("-inf")   # one token of a group masked: the other gets all the weight
    full = total // ratio * ratio
    with poisoned_outputs():
        one = dsv4rt.ops.kv_compress(kv[:, :full], None if score is None else score[:, :full], None, ratio, False,
                                     backend=variant)
    want = ref.kv_compress(kv[:, :full], None if score is None else score[:, :full], None, ratio, False)
    check = tol.pooling("kv_compress", {"kv": kv[:, :full], "gate": None if score is None else score[:, :full],
                                        "ape": None, "ratio": ratio, "overlap": False, "prev_kv": None,
                                        "prev_gate": None}, (one,), (want,))
    assert check.passed, check.message
    st = Csa2State(b, ratio, d, variant)
    got, pos = [], 0
    steps = chunks + [1] * (total - sum(chunks))      # prefill chunks, then one token per decode step
    for n in steps:
        out = st.feed(kv[:, pos:pos + n], None if score is None else score[:, pos:pos + n])
        assert out.shape[1] == (pos + n) // ratio - pos // ratio
        if n == 1:
            assert out.shape[1] == int((pos + 1) % ratio == 0), f"decode at pos {pos}"
        got.append(out)
        pos += n
    assert st.n == total % ratio
    chunked = torch.cat(got, dim=1)
    assert chunked.shape == one.shape
    assert torch.allclose(chunked, one, rtol=2.0**-20, atol=0.0), (chunked - one).abs().max()


# ---------------------------------------------------------------------------------------------- reference

def test_reference_ratio2_is_a_pairwise_softmax_per_channel():
    g = torch.Generator().manual_seed(1)
    kv, score = torch.randn(2, 8, 5, generator=g), torch.randn(2, 8, 5, generator=g) * 4
    out = ref.kv_compress(kv, score, None, 2, False)
    k, s = kv.to(F64).view(2, 4, 2, 5), score.to(F64).view(2, 4, 2, 5)
    w0 = 1.0 / (1.0 + torch.exp(s[:, :, 1] - s[:, :, 0]))
    assert torch.allclose(out, w0 * k[:, :, 0] + (1 - w0) * k[:, :, 1], rtol=1e-12, atol=1e-14)
    assert torch.equal(out, ref.kv_compress(kv, score, torch.zeros(2, 5), 2, False))   # None = zero bias


def test_reference_ratio1_without_gate_is_the_rows_themselves():
    kv = torch.randn(3, 7, 16).bfloat16()
    out = ref.kv_compress(kv, None, None, 1, False)
    assert out.dtype == F64 and torch.equal(out, kv.to(F64))


# ---------------------------------------------------------------------------------------------- CPU variants

@pytest.mark.parametrize("variant", _cpu_variants())
@pytest.mark.parametrize("ratio,gated,chunks", [(2, True, [5, 1, 4]), (2, True, [1, 1, 1, 2]), (2, True, [8]),
                                                (1, False, [3, 1, 6]), (1, True, [2, 5])])
def test_decode_state_chunked_prefill_equals_one_pass(variant, ratio, gated, chunks):
    chunked_vs_one_pass(variant, ratio, gated, chunks, seed=ratio * 100 + len(chunks))


@pytest.mark.parametrize("variant", _cpu_variants())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ratio1_without_gate_is_exact(variant, dtype):
    kv = (torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(7)) * 100).to(dtype)
    kv[0, 1, 2], kv[1, 3, 4], kv[1, 5, 6] = float("nan"), float("inf"), float("-inf")
    with poisoned_outputs():
        out = dsv4rt.ops.kv_compress(kv.transpose(1, 2).contiguous().transpose(1, 2), None, None, 1, False,
                                     backend=variant)
    assert out.dtype == torch.float32 and out.shape == kv.shape
    assert torch.equal(out.nan_to_num(0.0), kv.float().nan_to_num(0.0)) and torch.equal(out.isnan(), kv.isnan())


@pytest.mark.parametrize("variant", _cpu_variants())
def test_ratio2_pair_with_both_gates_minus_inf_is_nan_and_one_minus_inf_takes_the_other(variant):
    kv = torch.randn(1, 6, 4, generator=torch.Generator().manual_seed(3))
    score = torch.zeros(1, 6, 4)
    score[0, 0:2, 0] = float("-inf")           # group 0, channel 0: empty softmax
    score[0, 2, 1] = float("-inf")             # group 1, channel 1: token 3 alone
    out = dsv4rt.ops.kv_compress(kv, score, None, 2, False, backend=variant)
    assert out[0, 0, 0].isnan() and not out[0, 0, 1:].isnan().any()
    assert out[0, 1, 1] == kv[0, 3, 1]
    assert torch.allclose(out[0, 2], (kv[0, 4] + kv[0, 5]) / 2, rtol=1e-6)


@pytest.mark.parametrize("call,arg", [
    (lambda kv: dsv4rt.ops.kv_compress(kv, None, None, 2, False), "gate"),
    (lambda kv: dsv4rt.ops.kv_compress(kv, None, torch.zeros(1, 8), 1, False), "ape"),
    (lambda kv: dsv4rt.ops.kv_compress(kv, None, None, 1, True), "overlap"),
    (lambda kv: dsv4rt.ops.kv_compress(kv[:, :5], kv[:, :5], None, 2, False), "kv"),
    (lambda kv: dsv4rt.ops.kv_compress(kv, kv, None, 2, False, kv[:, :2], kv[:, :2]), "prev_kv"),
])
def test_bad_v41_calls_name_the_argument(call, arg):
    with pytest.raises(ContractError) as err:
        call(torch.randn(1, 6, 8))
    assert err.value.arg == arg and "kv_compress" in str(err.value)


def test_v4_calls_keep_their_selection_key():
    """The new modes are None-able arguments: a V4 call binds the same arguments as before."""
    op = dsv4rt.ops.kv_compress
    kv, ape = torch.randn(1, 8, 16), torch.randn(4, 16)
    assert [p.name for p in op.spec.params] == ["kv", "gate", "ape", "ratio", "overlap", "prev_kv", "prev_gate"]
    assert op._bind((kv, kv, ape, 4, True), {}) == (kv, kv, ape, 4, True, None, None)


# ---------------------------------------------------------------------------------------------- ascend

def test_ascend_runs_the_v41_modes_on_the_composite_path(monkeypatch):
    """No torch_npu op computes this pooling (docs/ascend.md: the compressor kernel is vllm-ascend's own
    ``_C_ascend.compressor``, which fuses the projections, norm and RoPE): ascend registers only the
    composite ``ascend/torch`` kv_compress, and it runs the V4.1 modes without calling torch_npu."""
    from dsv4rt.backend import Registrar
    from dsv4rt.backends import composite
    from dsv4rt.backends.ascend import AscendBackend, fake_torch_npu

    fake = fake_torch_npu.make(223)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    backend = AscendBackend()
    registrar = Registrar(backend, REGISTRY.specs)
    backend.load(registrar)
    # ascend/triton (the Triton kernels through triton-ascend, declining without it) is no torch_npu op
    impls = [i for i in registrar.implementations if i.op == "kv_compress" and i.variant != "triton"]
    assert [i.variant for i in impls] == ["torch"] and impls[0].fn is composite.implementations()["kv_compress"]
    g = torch.Generator().manual_seed(5)
    kv, score = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    for gate, ratio in ((score, 2), (None, 1)):
        args = {"kv": kv, "gate": gate, "ape": None, "ratio": ratio, "overlap": False, "prev_kv": None,
                "prev_gate": None}
        with poisoned_outputs():
            out = impls[0].fn(*args.values())
        check = tol.pooling("kv_compress", args, (out,), (ref.kv_compress(**args),))
        assert check.passed, check.message
    assert fake.recorder.calls == []


# ---------------------------------------------------------------------------------------------- cuda/triton

TRITON_SCRIPT = r"""
import json, sys, traceback
from dsv4rt.backends.cuda import enable_interpreter
enable_interpreter()
sys.path.insert(0, sys.argv[1])
import test_kv_compress_v41 as T
out = {}
for ratio, gated, chunks in ((2, True, [5, 1, 4]), (2, True, [1, 1, 1, 2]), (1, False, [3, 1, 6]), (1, True, [2, 5])):
    name = f"r{ratio}-{'gate' if gated else 'no-gate'}-{chunks}"
    try:
        T.chunked_vs_one_pass("cuda/triton", ratio, gated, chunks, seed=ratio * 100 + len(chunks))
        out[name] = "ok"
    except Exception:
        out[name] = traceback.format_exc()[-3000:]
print("RESULTS " + json.dumps(out))
"""


def test_decode_state_on_cuda_triton_under_the_interpreter():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed: cuda/triton runs only under its interpreter here")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSV4RT_", "TRITON_"))}
    env["DSV4RT_TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, os.path.dirname(__file__)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1][8:])
    assert len(results) == 4 and all(v == "ok" for v in results.values()), results
