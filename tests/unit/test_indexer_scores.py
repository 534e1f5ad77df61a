"""indexer_scores (the whole lightning-indexer score matrix) and MXFP4 indexer keys.

Every CPU variant against the float64 reference (poisoned outputs, the conformance tolerance), the scores
indexer_topk returns equal to the matrix's entries at its indices, MXFP4 keys packed by
:func:`dsv4rt.formats.quant_mxfp4` scoring exactly as the release's fake-quantised float keys, the tolerance
check failing on wrong matrices, and contract errors.
Backends are certified by the conformance cases (runtime/conformance/cases/indexer.py).
"""
from __future__ import annotations

import pytest
import torch

import dsv4rt.reference as ref
from dsv4rt import ops
from dsv4rt.backend import poisoned_outputs
from dsv4rt.backends.cpu import native_status
from dsv4rt.conformance import tolerance
from dsv4rt.errors import ContractError
from dsv4rt.formats import dequant_mxfp4, fp4_fake_quant, quant_mxfp4

CPU = ("cpu/numpy", "cpu/torch") + (("cpu/native",) if native_status()[0] else ())
NINF = float("-inf")


def call(seed: int, b: int = 2, s: int = 5, h: int = 32, d: int = 64, n: int = 40, dtype=torch.bfloat16,
         mx: bool = False, e8m0: bool = False) -> dict:
    """V4.1-style inputs: FP4-simulated q and keys, random visible lengths (0 and N included)."""
    g = torch.Generator().manual_seed(seed)
    q = fp4_fake_quant(torch.randn((b, s, h, d), generator=g)).to(dtype)
    kf = fp4_fake_quant(torch.randn((b, n, d), generator=g) * 3)
    vis = torch.randint(0, n + 1, (b, s), generator=g, dtype=torch.int32)
    vis[0, 0], vis[-1, -1] = 0, n
    a = {"q": q, "k": kf.to(dtype), "weights": torch.randn((b, s, h), generator=g), "visible": vis,
         "k_scale": None, "score_dtype": None}
    if mx:
        a["k"], a["k_scale"] = quant_mxfp4(kf)
        if e8m0:
            a["k_scale"] = a["k_scale"].view(torch.float8_e8m0fnu)
    return a


def check(a: dict, out: torch.Tensor):
    return tolerance.index_scores("indexer_scores", a, (out,), (ref.indexer_scores(**a),))


@pytest.mark.parametrize("variant", CPU)
@pytest.mark.parametrize("mx,sd", [(False, None), (False, torch.float32), (True, None), (True, torch.float32)])
def test_scores_match_the_reference(variant, mx, sd):
    a = dict(call(1, mx=mx, e8m0=mx), score_dtype=sd)
    with poisoned_outputs():
        out = ops.indexer_scores(**a, backend=variant)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 40)
    c = check(a, out)
    assert c.passed, (variant, c.message)
    beyond = torch.arange(40) >= a["visible"][..., None]
    assert bool((out[beyond] == NINF).all()) and bool(torch.isfinite(out[~beyond]).all())


@pytest.mark.parametrize("variant", CPU)
def test_topk_scores_are_the_matrix_entries(variant):
    """indexer_topk's returned scores are the indexer_scores entries at its indices (one scoring code path)."""
    a = call(2, mx=True)
    full = ops.indexer_scores(**a, backend=variant)
    idx, sc = ops.indexer_topk(a["q"], a["k"], a["weights"], a["visible"], 8, a["k_scale"], True,
                               sorted_output=True, backend=variant)
    ok = idx >= 0
    got = full.gather(2, idx.clamp(min=0).long())
    assert torch.equal(sc[ok], got[ok])
    assert bool((sc[~ok] == NINF).all())


@pytest.mark.parametrize("variant", CPU)
def test_mxfp4_keys_score_as_the_fake_quantised_keys(variant):
    """Packed keys (quant_mxfp4 of any keys) decode to exactly fp4_fake_quant of them: the packed call and the
    float call on the fake-quantised keys give the same scores and the same top-k."""
    g = torch.Generator().manual_seed(3)
    raw = torch.randn((1, 33, 128), generator=g) * 5
    packed, scale = quant_mxfp4(raw)
    assert torch.equal(dequant_mxfp4(packed, scale), fp4_fake_quant(raw))
    a = call(4, b=1, s=3, d=128, n=33, dtype=torch.float32)
    fq = dict(a, k=fp4_fake_quant(raw), score_dtype=torch.float32)
    mx = dict(fq, k=packed, k_scale=scale.view(torch.float8_e8m0fnu))
    torch.testing.assert_close(ops.indexer_scores(**mx, backend=variant), ops.indexer_scores(**fq, backend=variant),
                               rtol=1e-6, atol=1e-6)
    top = {name: ops.indexer_topk(x["q"], x["k"], x["weights"], x["visible"], 5, x["k_scale"],
                                  score_dtype=torch.float32, sorted_output=True, backend=variant)
           for name, x in (("mx", mx), ("fq", fq))}
    assert torch.equal(top["mx"], top["fq"])


def test_reference_mxfp4_nibble_order_and_scale():
    """One key written out by hand: byte 0x71 holds element 0 = code 1 (0.5) and element 1 = code 7 (6); E8M0
    byte 129 scales the first 32 elements by 4, byte 126 the next 32 by 0.5."""
    k = torch.zeros((1, 1, 32), dtype=torch.uint8)
    k[0, 0, 0] = 0x71
    k[0, 0, 16] = 0xA0          # element 32 = code 0 (0), element 33 = code 10 (-1)
    scale = torch.tensor([[[129, 126]]], dtype=torch.uint8)
    q = torch.zeros((1, 1, 1, 64))
    q[0, 0, 0, :2] = torch.tensor([1.0, 10.0])
    q[0, 0, 0, 33] = -3.0
    w = torch.ones((1, 1, 1))
    vis = torch.ones((1, 1), dtype=torch.int32)
    want = 0.5 * 4 + 10 * 6 * 4 + (-3.0) * (-1 * 0.5)      # 243.5
    assert float(ref.indexer_scores(q, k, w, vis, scale, torch.float32)[0, 0, 0]) == want
    for v in CPU:
        assert float(ops.indexer_scores(q, k, w, vis, scale, torch.float32, backend=v)[0, 0, 0]) == want, v


@pytest.mark.parametrize("sd,factor", [(torch.float32, 1.001), (None, 1.5)])
def test_check_fails_on_wrong_matrices(sd, factor):
    a = dict(call(5), score_dtype=sd)
    good = ref.indexer_scores(**a).float()
    assert check(a, good).passed
    live = torch.isfinite(good)
    off = good.clone()
    off[live] = off[live] * factor + 0.01
    assert not check(a, off).passed
    leak = good.clone()
    leak[~live] = 0.0                      # invisible keys must be -inf
    assert not check(a, leak).passed


def test_nan_scores_are_minus_inf():
    a = call(6, dtype=torch.float32)
    a["q"][0, 1, 3, 0] = float("nan")      # query (0, 1): every visible key scores NaN
    for v in CPU:
        out = ops.indexer_scores(**a, backend=v)
        assert bool((out[0, 1] == NINF).all()), v
        assert check(a, out).passed, v


@pytest.mark.parametrize("change,arg", [
    (lambda a: dict(a, k=a["k"][..., :16]), "k"),
    (lambda a: dict(a, k_scale=a["k_scale"].float()), "k_scale"),
    (lambda a: dict(a, k_scale=None), "k_scale"),
    (lambda a: dict(a, k_scale=a["k_scale"][..., :1]), "k_scale"),
    (lambda a: dict(a, k_scale=torch.full_like(a["k_scale"], 255)), "k_scale"),
    (lambda a: dict(a, score_dtype=torch.int8), "score_dtype"),
    (lambda a: dict(a, visible=a["visible"] + 100), "visible"),
])
def test_bad_arguments_name_the_argument(change, arg):
    a = change(call(8, mx=True))
    for op in (ops.indexer_scores,):
        with pytest.raises(ContractError, match=f"'{arg}'"):
            op(**a)
    b = {k: v for k, v in a.items() if k != "score_dtype"}
    with pytest.raises(ContractError, match=f"'{arg}'"):
        ops.indexer_topk(b["q"], b["k"], b["weights"], b["visible"], 4, b["k_scale"],
                         score_dtype=a["score_dtype"])


@pytest.mark.skipif(not native_status()[0], reason="dsv4rt._C is not built")
def test_native_scores_argument_errors():
    from dsv4rt import _C

    if not hasattr(_C, "indexer_scores"):
        pytest.skip("this dsv4rt._C build predates indexer_scores")
    q, k = torch.randn(1, 2, 3, 32).numpy(), torch.randint(0, 255, (1, 8, 16), dtype=torch.uint8).numpy()
    w, vis = torch.randn(1, 2, 3).numpy(), torch.full((1, 2), 8, dtype=torch.int32).numpy()
    out = torch.zeros(1, 2, 8).numpy()
    with pytest.raises(ValueError, match="indexer_scores: argument 'k_scale'"):
        _C.indexer_scores(q, k, torch.zeros(1, 8, 2, dtype=torch.uint8).numpy(), w, vis, out, False)
    with pytest.raises(ValueError, match="indexer_scores: argument 'out'"):
        _C.indexer_scores(q, k, torch.zeros(1, 8, 1, dtype=torch.uint8).numpy(), w, vis, out[:, :, :4].copy(), False)
