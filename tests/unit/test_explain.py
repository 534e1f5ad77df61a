"""op.explain(...) prints every candidate with its verdict and reason."""
import torch

import dsv4rt
from dsv4rt.formats import quant_mxfp4


def _args(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    w, s = quant_mxfp4(torch.randn(16, 64, generator=g))
    return x, w, s


def test_automatic_lists_losing_variants_of_the_chosen_backend():
    x, w, s = _args()
    choice = dsv4rt.ops.fp4_gemm.explain(x, w, s)
    text = str(choice)
    cpu = [i for i in dsv4rt.REGISTRY.implementations("fp4_gemm", "cpu")]
    assert choice.impl.name in text.splitlines()[0] and "automatic" in text
    for impl in cpu:
        assert impl.name in text
        if impl.name != choice.impl.name:
            assert f"priority {impl.priority} < {choice.impl.priority}" in text
    assert "cuda" in text and "unavailable" in text       # rejected backend with its probe reason


def test_use_backend_and_backend_arg_say_what_decided():
    x, w, s = _args(1)
    text = str(dsv4rt.ops.fp4_gemm.explain(x, w, s, backend="cpu/numpy"))
    assert "cpu/numpy (decided by the backend= argument)" in text
    assert "not considered  the backend= argument names the variant cpu/numpy" in text
    with dsv4rt.use_backend("cpu"):
        text = str(dsv4rt.ops.fp4_gemm.explain(x, w, s))
    assert "use_backend('cpu')" in text.splitlines()[0]
    assert "cuda" in text and "restricts the choice to cpu" in text


def test_supports_refusal_is_the_reason():
    x, w, s = _args(2)
    with dsv4rt.use_backend({"fp4_gemm": "cpu"}):
        choice = dsv4rt.ops.fp4_gemm.explain(x, w, s, act_quant="fp8")
    text = str(choice)
    for name, reason in choice.rejected:   # every rejected candidate appears with its reason
        assert name in text and reason in text
    assert len(text.splitlines()) >= 2
