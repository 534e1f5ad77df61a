"""sparse_attention over the V4.1 packed cache (kv_format="v41"): every variant gives the same bits as the
same call on the dequantised bf16 buffer (the release's QDQ cache), the native kernel stays batch-invariant,
and V4 calls are untouched."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dsv4rt import ops
from dsv4rt.errors import ContractError
from dsv4rt.formats import pack_kv_fp4, pack_kv_fp8, unpack_kv_fp4, unpack_kv_fp8

try:
    from dsv4rt import _C
except ImportError:   # pragma: no cover - the extension is built in CI
    _C = None

CPU = ["cpu/torch", "cpu/numpy"] + (["cpu/native"] if _C is not None else [])


def _case(seed: int, b: int = 2, s: int = 3, h: int = 8, d: int = 128, n: int = 20, m: int = 50, k: int = 40,
          dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n + m, d, generator=g) * torch.exp(torch.randn(b, n + m, 1, generator=g) * 2)
    kv, glob = pack_kv_fp8(x[:, :n].bfloat16()), pack_kv_fp4(x[:, n:].bfloat16())
    q = torch.randn(b, s, h, d, generator=g).to(dtype)
    idx = torch.randint(-1, n + m, (b, s, k), generator=g, dtype=torch.int32)
    sink = torch.randn(h, generator=g)
    return q, kv, glob, idx, sink


def _dequantised(kv: torch.Tensor, glob: torch.Tensor | None) -> torch.Tensor:
    rows = [unpack_kv_fp8(kv)] + ([] if glob is None else [unpack_kv_fp4(glob)])
    return torch.cat(rows, dim=1).bfloat16()            # exact: the decoded values fit bf16


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("with_global", [True, False])
def test_packed_cache_gives_the_bits_of_its_bf16_buffer(backend, with_global):
    q, kv, glob, idx, sink = _case(1)
    if not with_global:
        glob, idx = None, torch.where(idx < kv.shape[1], idx, -1)
    o, lse = ops.sparse_attention(q, kv, idx, sink, 0.1, True, kv_format="v41", kv_global=glob, backend=backend)
    o2, lse2 = ops.sparse_attention(q, _dequantised(kv, glob), idx, sink, 0.1, True, backend=backend)
    assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()
    assert torch.equal(o, o2) and torch.equal(lse, lse2)


_TRITON_CHILD = """
import torch
from dsv4rt.backends.cuda import enable_interpreter
enable_interpreter()
from dsv4rt.backends.cuda.attention import sparse_attention
from test_attention_v41 import _case, _dequantised
for q_dtype in (torch.bfloat16, torch.float32):
    q, kv, glob, idx, sink = _case(2, b=1, s=2, h=4, d=64, n=10, m=20, k=24, dtype=q_dtype)
    o, lse = sparse_attention(q, kv, idx, sink, 0.1, True, None, "v41", glob)
    o2, lse2 = sparse_attention(q, _dequantised(kv, glob).to(q_dtype), idx, sink, 0.1, True, q_dtype)
    assert torch.equal(o, o2) and torch.equal(lse, lse2), (q_dtype, (o.float() - o2.float()).abs().max())
print("same bits")
"""


def test_triton_interpreter_packed_cache_gives_the_bits_of_its_bf16_buffer():
    """The Triton kernel's in-kernel bit decode equals the same kernel on the dequantised buffer (interpreter,
    in a child process: the interpreter must be on before Triton is imported)."""
    pytest.importorskip("triton", reason="Triton is not installed")
    env = dict(os.environ, DSV4RT_TRITON_INTERPRET="1", PYTHONPATH=os.path.dirname(__file__))
    res = subprocess.run([sys.executable, "-c", _TRITON_CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "same bits" in res.stdout, res.stdout + res.stderr


@pytest.mark.skipif(_C is None, reason="dsv4rt._C is not built")
def test_native_row_does_not_depend_on_the_other_rows():
    """A decode row with 700 valid entries over both caches, alone and among 8 other rows (batch-invariant mode)."""
    from dsv4rt import invariant
    q, kv, glob, idx, sink = _case(3, b=1, s=9, h=8, d=64, n=128, m=900, k=800)
    idx[:, :, 700:] = -1
    idx[:, 3:, 300:] = -1
    with invariant.mode(True):
        full = ops.sparse_attention(q, kv, idx, sink, 0.125, kv_format="v41", kv_global=glob, backend="cpu/native")
        alone = ops.sparse_attention(q[:, :1], kv, idx[:, :1], sink, 0.125, kv_format="v41", kv_global=glob,
                                     backend="cpu/native")
    assert torch.equal(alone[0, 0], full[0, 0])


def test_p_dtype_default_is_q_dtype_for_the_packed_cache():
    from dsv4rt.ops.attention import p_dtype_of
    q, kv, glob, idx, sink = _case(4, dtype=torch.float16)
    a = dict(q=q, kv=kv, idx=idx, p_dtype=None, kv_format="v41", kv_global=glob)
    assert p_dtype_of(a) == torch.float16
    assert p_dtype_of(dict(a, p_dtype=torch.float32)) == torch.float32
    assert p_dtype_of(dict(q=q, kv=q[:, 0], p_dtype=None)) == torch.float16


def test_contract_errors_name_the_argument():
    q, kv, glob, idx, sink = _case(5)
    with pytest.raises(ContractError, match="kv_global"):
        ops.sparse_attention(q, kv, idx, sink, 0.1, kv_format="v41", kv_global=glob[:, :, :-1])
    with pytest.raises(ContractError, match="'kv'.*uint8"):
        ops.sparse_attention(q, kv.float(), idx, sink, 0.1, kv_format="v41", kv_global=glob)
    with pytest.raises(ContractError, match="kv_format"):
        ops.sparse_attention(q, kv, idx, sink, 0.1, kv_format="fp8", kv_global=glob)
    with pytest.raises(ContractError, match="idx"):
        ops.sparse_attention(q, kv, idx, sink, 0.1, kv_format="v41")        # idx reaches the absent global rows
