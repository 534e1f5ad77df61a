"""cuda/triton kernels of the indexer, attention and MoE families under Triton's interpreter (no GPU).

The kernel checks run in one subprocess with ``DSV4RT_TRITON_INTERPRET=1`` (the interpreter must be on
before any kernel is defined, and must not leak into other tests). Outputs are poisoned and judged by the
conformance tolerances against the float64 reference. Skipped, with a warning, when Triton is missing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest

if importlib.util.find_spec("triton") is None:
    warnings.warn("Triton is not installed: the cuda/triton kernel tests in test_triton_ops.py are SKIPPED "
                  "(pip install triton to run them under the interpreter)")
    pytest.skip("Triton is not installed: cuda/triton kernels are untested here (pip install triton)",
                allow_module_level=True)

SCRIPT = r"""
import json, traceback
import torch
from dsv4rt.backends.cuda import enable_interpreter
enable_interpreter()
from dsv4rt import reference as ref
from dsv4rt.backend import poisoned_outputs
from dsv4rt.conformance import tolerance as tol
from dsv4rt.backends.cuda import attention as A, indexer as I, moe as M

out = {}
g = torch.Generator().manual_seed(1234)


def check(name):
    def run(fn):
        try:
            with poisoned_outputs():
                fn()
            out[name] = "ok"
        except Exception:
            out[name] = traceback.format_exc()[-3000:]
    return run


def topk_case(b, s, h, d, n, topk, vis, distinct_keys, zero_rows=()):
    base = torch.randn(distinct_keys, d, generator=g)
    k = base[torch.randint(0, distinct_keys, (b, n), generator=g)].bfloat16()   # repeated keys: tied scores
    q = torch.randn(b, s, h, d, generator=g).bfloat16()
    w = torch.randn(b, s, h, generator=g)
    for bi, si in zero_rows:
        w[bi, si] = 0.0                                                        # every score 0: all tied
    args = {"q": q, "k": k, "weights": w, "visible": vis, "topk": topk, "k_scale": None, "return_scores": True}
    outs = I.indexer_topk(q, k, w, vis, topk, None, True)
    idx = outs[0]
    for bi in range(b):
        for si in range(s):
            row, count = idx[bi, si], min(topk, int(vis[bi, si]))
            valid = row[row >= 0]
            assert valid.numel() == count and int((row == -1).sum()) == topk - count, (bi, si, row.tolist())
            assert valid.unique().numel() == count and bool((valid < int(vis[bi, si])).all()), row.tolist()
    c = tol.topk("indexer_topk", args, outs, ref.indexer_topk(**args))
    assert c.passed, c.message


@check("topk_ties_and_fewer_visible")
def _():
    vis = torch.tensor([[40, 40, 10, 3, 0, 17, 16]], dtype=torch.int32)
    topk_case(1, 7, 4, 32, 40, 16, vis, distinct_keys=5, zero_rows=((0, 0), (0, 5)))


@check("topk_query_chunks")
def _():
    # a score buffer of 2 queries x 40 keys: the launcher runs the queries in 4 chunks of views
    I.SCORE_ELEMS, saved = 80, I.SCORE_ELEMS
    try:
        vis = torch.tensor([[40, 12, 0, 40, 5, 33, 1]], dtype=torch.int32)
        topk_case(1, 7, 4, 32, 40, 8, vis, distinct_keys=6)
    finally:
        I.SCORE_ELEMS = saved


@check("topk_multi_chunk_row")
def _():
    # rows longer than one select chunk (4096): histograms and compaction carry across chunks, ties included
    vis = torch.tensor([[5000, 4100], [4096, 30]], dtype=torch.int32)
    topk_case(2, 2, 2, 16, 5000, 64, vis, distinct_keys=40, zero_rows=((1, 0),))


def attn_case(b, s, h, d, n, kk, path, sink=True):
    q = torch.randn(b, s, h, d, generator=g).bfloat16()
    kv = torch.randn(b, n, d, generator=g).bfloat16()
    idx = torch.randint(0, n, (b, s, kk), generator=g, dtype=torch.int32)
    idx[torch.rand(b, s, kk, generator=g) < 0.2] = -1
    idx[0, 0, kk // 3:] = -1          # whole splits without a valid entry
    idx[-1, -1] = -1                  # a row with no valid entry
    sk = torch.randn(h, generator=g) if sink else None
    args = {"q": q, "kv": kv, "idx": idx, "sink": sk, "scale": d ** -0.5, "return_lse": True}
    p = A.plan(args)
    assert p.path == path, p
    assert path == "prefill" or p.splits >= 2, p
    outs = A.sparse_attention(q, kv, idx, sk, d ** -0.5, True)
    c = tol.attention("sparse_attention", args, outs, ref.sparse_attention(**args))
    assert c.passed, c.message
    assert bool((outs[0][-1, -1] == 0).all())


@check("attention_decode_split")
def _():
    attn_case(2, 1, 16, 64, 300, 200, "decode")
    attn_case(1, 2, 4, 32, 100, 150, "decode", sink=False)


@check("precision_points")
def _():
    from dsv4rt.conformance.precision import check_attention_p_dtype, check_indexer_score_dtype
    check_attention_p_dtype(A.sparse_attention, seed=3)
    check_indexer_score_dtype(I.indexer_topk, seed=5, modes=(torch.bfloat16, torch.float16))


@check("attention_prefill")
def _():
    attn_case(2, 12, 8, 64, 80, 40, "prefill")
    attn_case(1, 20, 20, 32, 50, 70, "prefill", sink=False)


def dispatch_case(x, ids, e, plan):
    xs, off, src = M._dispatch(x, ids, e, plan)
    want = ref.moe_dispatch(x, ids, e)
    assert torch.equal(src, want[2]), (plan, src.tolist())
    assert torch.equal(off, want[1]), (plan, off.tolist())
    assert torch.equal(xs, x[src.long() // ids.shape[1]])


@check("dispatch_stable_all_to_one_expert")
def _():
    t, k, e = 200, 3, 8
    x = torch.randn(t, 24, generator=g).bfloat16()
    ids = torch.full((t, k), 5, dtype=torch.int32)
    plans = [M.dispatch_plan(t * k, e, True, fused_max=1024), M.dispatch_plan(t * k, e, True, fused_max=0),
             M.DispatchPlan("blocks", block_r=32, sub=16, nblk=-(-t * k // 32), nbc=4)]
    assert [p.path for p in plans] == ["fused", "blocks", "blocks"], plans
    for p in plans:
        dispatch_case(x, ids, e, p)
        ids_rand = torch.randint(0, e, (t, k), generator=g, dtype=torch.int32)
        dispatch_case(x, ids_rand, e, p)


@check("route_equal_logits")
def _():
    logits = torch.zeros(5, 16)                     # every expert ties: still 6 distinct ids
    ids, w = M.moe_route(logits, None, 6, 1.5)
    assert all(r.unique().numel() == 6 for r in ids), ids.tolist()
    assert torch.allclose(w, torch.full_like(w, 0.25))


print("RESULTS " + json.dumps(out))
"""

LAZY = r"""
import json, sys
import dsv4rt.backends.cuda.attention, dsv4rt.backends.cuda.indexer, dsv4rt.backends.cuda.moe
print(json.dumps(sorted(m for m in sys.modules if m == "triton" or m.startswith("triton."))))
"""


def _clean_env() -> dict[str, str]:
    """The environment without DSV4RT_* / TRITON_* settings of the calling process."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("DSV4RT_", "TRITON_"))}


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    """Runs the kernel checks once in an interpreter subprocess: check name -> 'ok' or the traceback."""
    env = dict(_clean_env(), DSV4RT_TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("name", ["topk_ties_and_fewer_visible", "topk_query_chunks", "topk_multi_chunk_row"])
def test_topk_returns_exactly_min_k_visible_distinct(results, name):
    assert results[name] == "ok", results[name]


def test_precision_points_are_honoured(results):
    """p_dtype of sparse_attention and score_dtype of indexer_topk, each against its own reference."""
    assert results["precision_points"] == "ok", results["precision_points"]


@pytest.mark.parametrize("name", ["attention_decode_split", "attention_prefill"])
def test_sparse_attention_paths(results, name):
    assert results[name] == "ok", results[name]


def test_dispatch_stable_when_every_pair_goes_to_one_expert(results):
    assert results["dispatch_stable_all_to_one_expert"] == "ok", results["dispatch_stable_all_to_one_expert"]


def test_route_distinct_ids_on_ties(results):
    assert results["route_equal_logits"] == "ok", results["route_equal_logits"]


def test_launcher_imports_do_not_import_triton():
    proc = subprocess.run([sys.executable, "-c", LAZY], capture_output=True, text=True, env=_clean_env(),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], "importing a cuda launcher imported triton"
