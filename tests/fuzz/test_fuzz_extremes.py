"""Extreme magnitudes: GEMMs whose dequantised weights are subnormal in float32 (E8M0 bytes 0, 1, 2; FP8
subnormals times tiny float32 scales) or huge (byte 200) agree with the float64 reference within the op's
conformance tolerance on every variant (cuda/triton under the interpreter flushed subnormal bf16 operands:
5-25% off before)."""
from __future__ import annotations

import pytest

from _child import assert_ok_on_variants

CHECK = """
import dsv4rt.reference as ref
from dsv4rt.conformance import tolerance
def check(op, args):
    out = getattr(dsv4rt.ops, op)(**args, backend=V)
    c = tolerance.gemm(op, dict(args, act_quant=args.get("act_quant")), (out,), (getattr(ref, op)(**args),))
    assert c.passed, f"{op}: {c.message or c.tolerance} (max rel {c.max_rel:.3g})"
g = torch.Generator().manual_seed(7)
"""

FP4 = CHECK + """
for dt in (torch.bfloat16, torch.float32):
    for m in (1, 40):
        x = torch.randn(m, 128, generator=g).to(dt)
        w = torch.randint(0, 256, (48, 64), generator=g, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
        s = torch.full((48, 4), BYTE, dtype=torch.uint8)
        s[::3, 1] = 127                                          # mixed with ordinary blocks
        check("fp4_gemm", dict(x=x, w=w, w_scale=s.view(torch.float8_e8m0fnu)))
x = torch.randn(24, 128, generator=g).to(torch.bfloat16)
w = torch.randint(0, 256, (3, 32, 64), generator=g, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
s = torch.full((3, 32, 4), BYTE, dtype=torch.uint8).view(torch.float8_e8m0fnu)
check("fp4_grouped_gemm", dict(x=x, w=w, w_scale=s, offsets=torch.tensor([0, 5, 5, 24], dtype=torch.int32)))
"""

FP8 = CHECK + """
for dt in (torch.bfloat16, torch.float32):
    for m in (1, 40):
        x = torch.randn(m, 256, generator=g).to(dt)
        w = torch.randn(128, 256, generator=g).mul(0.01).to(torch.float8_e4m3fn)   # many E4M3 subnormals
        s = torch.full((1, 2), BYTE, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        check("fp8_gemm", dict(x=x, w=w, w_scale=s))
        sf = torch.full((1, 2), 2.0 ** (BYTE - 127), dtype=torch.float32)
        check("fp8_gemm", dict(x=x, w=w, w_scale=sf))
"""

@pytest.mark.parametrize("interp", [False, True], ids=["cpu", "cuda-interpreter"])
def test_extreme_scales_within_tolerance(interp):
    if interp:
        pytest.importorskip("triton", reason="Triton is not installed: cuda/triton cases need its interpreter")
    assert_ok_on_variants({f"{name}-byte{b}": code.replace("BYTE", str(b))
                           for name, code in (("fp4", FP4), ("fp8", FP8)) for b in (0, 1, 2, 200)}, interp)
