"""Hostile inputs for the V4.1 ops of this family set: engram_hash, engram_lookup and moe_route's V4.1 mode
(per-token bias selector, weight_eps), on every CPU variant and on cuda/triton under Triton's interpreter.
The rule of tests/fuzz: a defined result or a clean dsv4rt error, never another exception or a crash; the
cases in MUST_REFUSE must be ContractErrors, and the snippets' own asserts check the results they state."""
from __future__ import annotations

import pytest

from _child import CPU_VARIANTS, run_cases

I64 = "dtype=torch.int64"
U8 = "dtype=torch.uint8"
_TAB = "torch.tensor([3,5,7]), torch.tensor([[11,13],[17,19]]), torch.tensor([0,11,24,41])"
_W = f"torch.randint(0,120,(10,64),{U8}), torch.full((10,2),127,{U8})"

EDGE = {
    # engram_hash
    "hash-T0": f"assert dsv4rt.ops.engram_hash(torch.zeros(0,3,{I64}), {_TAB}, 2, backend=V).shape == (0, 4)",
    "hash-H0": ("r = dsv4rt.ops.engram_hash(torch.ones(3,3,dtype=torch.int64), torch.tensor([3,5,7]), "
                "torch.zeros(2,0,dtype=torch.int64), torch.zeros(0,dtype=torch.int64), 2, backend=V)\n"
                "assert r.shape == (3, 0)"),
    "hash-N1": f"dsv4rt.ops.engram_hash(torch.ones(3,1,{I64}), torch.tensor([3]), torch.zeros(0,2,{I64}), torch.zeros(0,{I64}), 2, backend=V)",
    "hash-window-int32": f"dsv4rt.ops.engram_hash(torch.ones(3,3,dtype=torch.int32), {_TAB}, 2, backend=V)",
    "hash-window-below-dead": f"dsv4rt.ops.engram_hash(torch.full((3,3),-7,{I64}), {_TAB}, 2, backend=V)",
    "hash-all-dead": ("r = dsv4rt.ops.engram_hash(torch.full((4,3),-1,dtype=torch.int64), " + _TAB + ", 2, backend=V)\n"
                      "assert (r == r[0]).all() and r[0].tolist() == [(6^10) % 11, (6^10) % 13 + 11, (6^10^14) % 17 + 24, (6^10^14) % 19 + 41]"),
    "hash-expanded-window": f"dsv4rt.ops.engram_hash(torch.tensor([[4,-1,2]]).expand(5,3), {_TAB}, 2, backend=V)",
    "hash-transposed-window": f"dsv4rt.ops.engram_hash(torch.randint(0,9,(3,6),{I64}).t(), torch.arange(1,4), torch.full((2,1),5), torch.tensor([0,5]), 0, backend=V)",
    "hash-product-overflow": f"dsv4rt.ops.engram_hash(torch.tensor([[2**62, 1, 1]]), {_TAB}, 2, backend=V)",
    "hash-pad-overflow": f"dsv4rt.ops.engram_hash(torch.tensor([[-1, 1, 1]]), {_TAB}, 2**62, backend=V)",
    "hash-pad-2^63": f"dsv4rt.ops.engram_hash(torch.tensor([[1, 1, 1]]), {_TAB}, 2**63, backend=V)",
    "hash-prime-zero": f"dsv4rt.ops.engram_hash(torch.ones(2,3,{I64}), torch.tensor([3,5,7]), torch.tensor([[11,0],[17,19]]), torch.tensor([0,11,24,41]), 2, backend=V)",
    "hash-prime-negative": f"dsv4rt.ops.engram_hash(torch.ones(2,3,{I64}), torch.tensor([3,5,7]), torch.tensor([[11,-13],[17,19]]), torch.tensor([0,11,24,41]), 2, backend=V)",
    "hash-multiplier-negative": f"dsv4rt.ops.engram_hash(torch.ones(2,3,{I64}), torch.tensor([3,-5,7]), torch.tensor([[11,13],[17,19]]), torch.tensor([0,11,24,41]), 2, backend=V)",
    "hash-pad-bool": f"dsv4rt.ops.engram_hash(torch.ones(2,3,{I64}), {_TAB}, True, backend=V)",
    # engram_lookup
    "lookup-T0": f"assert dsv4rt.ops.engram_lookup(torch.zeros(0,24,{I64}), {_W}, backend=V).shape == (0, 24, 64)",
    "lookup-n0": f"assert dsv4rt.ops.engram_lookup(torch.zeros(3,0,{I64}), {_W}, backend=V).shape == (3, 0, 64)",
    "lookup-D0": f"assert dsv4rt.ops.engram_lookup(torch.zeros(3,2,{I64}), torch.zeros(10,0,{U8}), torch.zeros(10,0,{U8}), backend=V).shape == (3, 2, 0)",
    "lookup-rows0": f"dsv4rt.ops.engram_lookup(torch.zeros(1,1,{I64}), torch.zeros(0,32,{U8}), torch.zeros(0,1,{U8}), backend=V)",
    "lookup-out-of-range": f"dsv4rt.ops.engram_lookup(torch.full((2,3),10,{I64}), {_W}, backend=V)",
    "lookup-negative": f"dsv4rt.ops.engram_lookup(torch.full((2,3),-1,{I64}), {_W}, backend=V)",
    "lookup-ids-2^40": f"dsv4rt.ops.engram_lookup(torch.full((2,3),2**40,{I64}), {_W}, backend=V)",
    "lookup-ids-float": f"dsv4rt.ops.engram_lookup(torch.zeros(2,3), {_W}, backend=V)",
    "lookup-D48": f"dsv4rt.ops.engram_lookup(torch.zeros(2,3,{I64}), torch.zeros(10,48,{U8}), torch.zeros(10,1,{U8}), backend=V)",
    "lookup-fp16-out": f"dsv4rt.ops.engram_lookup(torch.zeros(2,3,{I64}), {_W}, torch.float16, backend=V)",
    "lookup-e8m0-255": (f"o = dsv4rt.ops.engram_lookup(torch.zeros(2,3,{I64}), torch.full((10,64),0x38,{U8}), torch.full((10,2),255,{U8}), backend=V)\n"
                        "assert o.isnan().all()"),
    "lookup-e4m3-nan": (f"o = dsv4rt.ops.engram_lookup(torch.zeros(1,1,{I64}), torch.full((10,64),0xFF,{U8}), torch.full((10,2),127,{U8}), torch.float32, backend=V)\n"
                        "assert o.isnan().all()"),
    "lookup-overflow-inf": (f"o = dsv4rt.ops.engram_lookup(torch.zeros(1,1,{I64}), torch.full((10,64),0x7E,{U8}), torch.full((10,2),254,{U8}), backend=V)\n"
                            "assert (o == float('inf')).all()"),
    "lookup-expanded-ids": f"dsv4rt.ops.engram_lookup(torch.tensor([[1, 9]]).expand(4, 2), {_W}, backend=V)",
    "lookup-transposed-table": ("w = torch.randint(0,120,(64,10),dtype=torch.uint8).t(); s = torch.full((2,10),127,dtype=torch.uint8).t()\n"
                                "o = dsv4rt.ops.engram_lookup(torch.tensor([[3, 7]]), w, s, torch.float32, backend=V)\n"
                                "import dsv4rt.formats as F\nassert torch.equal(o[0, 1], F.decode_e4m3(w[7].contiguous()))"),
    "lookup-expanded-table": f"dsv4rt.ops.engram_lookup(torch.tensor([[3, 7]]), torch.randint(0,120,(1,64),{U8}).expand(10,64), torch.full((1,2),127,{U8}).expand(10,2), backend=V)",
    # moe_route, V4.1 mode
    "route41-T0": ("dsv4rt.ops.moe_route(torch.randn(0,8), torch.zeros(8), 2, 1.5, 'sqrtsoftplus', None, torch.zeros(8), "
                   "torch.zeros(0,dtype=torch.bool), 1e-20, backend=V)"),
    "route41-expanded-selector": ("dsv4rt.ops.moe_route(torch.randn(5,8), torch.zeros(8), 2, 1.5, 'sqrtsoftplus', None, "
                                  "torch.randn(8), torch.tensor([True]).expand(5), 1e-20, backend=V)"),
    "route41-selector-int": ("dsv4rt.ops.moe_route(torch.randn(5,8), torch.zeros(8), 2, 1.5, 'sqrtsoftplus', None, "
                             "torch.randn(8), torch.ones(5,dtype=torch.int32), 1e-20, backend=V)"),
    "route41-alt-inf": ("dsv4rt.ops.moe_route(torch.randn(5,8), torch.zeros(8), 2, 1.5, 'sqrtsoftplus', None, "
                        "torch.full((8,), float('inf')), torch.ones(5,dtype=torch.bool), 1e-20, backend=V)"),
    "route41-eps-inf": "dsv4rt.ops.moe_route(torch.randn(5,8), torch.zeros(8), 2, 1.5, weight_eps=float('inf'), backend=V)",
    "route41-eps-str": "dsv4rt.ops.moe_route(torch.randn(5,8), torch.zeros(8), 2, 1.5, weight_eps='1e-20', backend=V)",
    "route41-eps-huge": ("ids, w = dsv4rt.ops.moe_route(torch.randn(5,8), torch.zeros(8), 2, 1.5, weight_eps=1e300, backend=V)\n"
                         "assert torch.isfinite(w).all() and (w >= 0).all() and (w.double() < 1e-290).all(), w"),
    "route41-very-negative": ("ids, w = dsv4rt.ops.moe_route(torch.full((3,8), -300.0), torch.zeros(8), 2, 1.5, 'sqrtsoftplus', "
                              "None, torch.ones(8), torch.tensor([True, False, True]), 1e-20, backend=V)\n"
                              "assert torch.isfinite(w).all() and (w >= 0).all() and (w.double() < 1e-30).all(), w"),
    "route41-all-alt-equals-alt-as-bias": ("g = torch.Generator().manual_seed(0); z = torch.randn(6,16,generator=g); b = torch.randn(16,generator=g)\n"
                                           "i1, w1 = dsv4rt.ops.moe_route(z, torch.zeros(16), 3, 1.5, 'sqrtsoftplus', None, b, torch.ones(6,dtype=torch.bool), backend=V)\n"
                                           "i2, w2 = dsv4rt.ops.moe_route(z, b, 3, 1.5, backend=V)\n"
                                           "assert torch.equal(i1.sort(1).values, i2.sort(1).values)"),
}
# integer overflow, a zero / negative modulus, out-of-range rows and ill-typed arguments must be refused
MUST_REFUSE = {"hash-N1", "hash-window-int32", "hash-window-below-dead", "hash-product-overflow", "hash-pad-overflow",
               "hash-pad-2^63", "hash-prime-zero", "hash-prime-negative", "hash-multiplier-negative", "hash-pad-bool",
               "lookup-rows0", "lookup-out-of-range", "lookup-negative", "lookup-ids-2^40", "lookup-ids-float",
               "lookup-D48", "lookup-fp16-out", "route41-selector-int", "route41-alt-inf", "route41-eps-inf",
               "route41-eps-str"}


def _bad(results: dict[str, str]) -> list[str]:
    bad = []
    for key, res in results.items():
        name = key.split(" @ ")[0]
        if name in MUST_REFUSE:
            if not res.startswith("dsv4rt ContractError"):
                bad.append(f"{key}: must be refused with a ContractError, got {res}")
        elif res != "ok":
            bad.append(f"{key}: {res}")
    return bad


def test_cpu_variants():
    todo = {f"{name} @ {v}": (v, code) for name, code in EDGE.items() for v in CPU_VARIANTS}
    bad = _bad(run_cases(todo, env={"DSV4RT_CHECK_VALUES": "always"}))
    assert not bad, "\n".join(bad)


def test_cuda_variants_under_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed: the cuda/triton cases need its interpreter")
    todo = {f"{name} @ {v}": (v, code) for name, code in EDGE.items() for v in ("cuda/triton", "cuda/torch")}
    bad = _bad(run_cases(todo, env={"DSV4RT_TRITON_INTERPRET": "1", "DSV4RT_CHECK_VALUES": "always"}))
    assert not bad, "\n".join(bad)
