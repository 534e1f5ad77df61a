"""Every op on every CPU variant (and cuda/triton + cuda/torch under Triton's interpreter) with hostile
inputs: zero-size dims, views with odd strides (transposed, stride-0 expanded), E8M0 bytes 0 and 255,
NaN/Inf activations and scales, int64 / out-of-range / duplicate indices, non-monotone offsets, top-k > N,
K not a multiple of 32. The rule for each case: a defined result or a clean dsv4rt error (ContractError
naming the argument, NoImplementationError for a variant that does not take the call), never another
exception and never a crash. With ``--fuzz-full`` seeded random shapes are added."""
from __future__ import annotations

import random

import pytest

from _child import CPU_VARIANTS, run_cases

T = "torch"
I32 = "dtype=torch.int32"
U8 = "dtype=torch.uint8"


def _w4(n: int, k: int, byte: int = 127) -> str:
    return f"torch.randint(0, 256, ({n}, {k // 2}), {U8}), torch.full(({n}, {max(k // 32, 0)}), {byte}, {U8})"


EDGE = {
    # sparse_attention
    "attn-S0": "dsv4rt.ops.sparse_attention(torch.randn(1,0,16,64), torch.randn(1,8,64), torch.zeros(1,0,4,dtype=torch.int32), None, .125, backend=V)",
    "attn-B0": "dsv4rt.ops.sparse_attention(torch.randn(0,2,4,64), torch.randn(0,8,64), torch.zeros(0,2,4,dtype=torch.int32), None, .125, backend=V)",
    "attn-H0": "dsv4rt.ops.sparse_attention(torch.randn(1,2,0,64), torch.randn(1,8,64), torch.zeros(1,2,4,dtype=torch.int32), torch.zeros(0), .125, True, backend=V)",
    "attn-D0": "dsv4rt.ops.sparse_attention(torch.randn(1,2,4,0), torch.randn(1,8,0), torch.zeros(1,2,4,dtype=torch.int32), None, .125, True, backend=V)",
    "attn-K0": "dsv4rt.ops.sparse_attention(torch.randn(1,2,4,64), torch.randn(1,8,64), torch.zeros(1,2,0,dtype=torch.int32), None, .125, True, backend=V)",
    "attn-N0": "dsv4rt.ops.sparse_attention(torch.randn(1,2,4,64), torch.randn(1,0,64), -torch.ones(1,2,3,dtype=torch.int32), None, .125, True, backend=V)",
    "attn-idx-int64": "dsv4rt.ops.sparse_attention(torch.randn(1,2,4,64), torch.randn(1,8,64), torch.zeros(1,2,3,dtype=torch.int64), None, .125, backend=V)",
    "attn-idx-out-of-range": "dsv4rt.ops.sparse_attention(torch.randn(1,2,4,64), torch.randn(1,8,64), torch.full((1,2,3),8,dtype=torch.int32), None, .125, backend=V)",
    "attn-expanded-kv": "dsv4rt.ops.sparse_attention(torch.randn(1,2,4,64), torch.randn(1,1,64).expand(1,8,64), torch.randint(0,8,(1,2,3),dtype=torch.int32), None, .125, backend=V)",
    "attn-transposed-q": "dsv4rt.ops.sparse_attention(torch.randn(1,4,2,64).transpose(1,2), torch.randn(1,8,64), torch.randint(0,8,(1,2,3),dtype=torch.int32), None, .125, backend=V)",
    "attn-nan-q": "dsv4rt.ops.sparse_attention(torch.full((1,2,4,64), float('nan')), torch.randn(1,8,64), torch.randint(0,8,(1,2,3),dtype=torch.int32), None, .125, True, backend=V)",
    "attn-scale-inf": "dsv4rt.ops.sparse_attention(torch.randn(1,2,4,64), torch.randn(1,8,64), torch.randint(0,8,(1,2,3),dtype=torch.int32), None, float('inf'), backend=V)",
    # sparse_attention, V4.1 packed cache (D = 64: FP8 rows of 66 bytes, FP4 rows of 36 bytes)
    "attn-v41-N0-M0": ("o, lse = dsv4rt.ops.sparse_attention(torch.randn(1,2,4,64).bfloat16(), torch.zeros(1,0,66,dtype=torch.uint8), -torch.ones(1,2,3,dtype=torch.int32), torch.zeros(4), .125, True, kv_format='v41', kv_global=torch.zeros(1,0,36,dtype=torch.uint8), backend=V)\n"
                       "assert (o == 0).all() and (lse == 0).all()"),
    "attn-v41-K0": "dsv4rt.ops.sparse_attention(torch.randn(1,2,4,64), torch.zeros(1,5,66,dtype=torch.uint8), torch.zeros(1,2,0,dtype=torch.int32), None, .125, True, kv_format='v41', backend=V)",
    "attn-v41-random-bytes": "dsv4rt.ops.sparse_attention(torch.randn(2,3,4,64).bfloat16(), torch.randint(0,256,(2,7,66),dtype=torch.uint8), torch.randint(-1,12,(2,3,9),dtype=torch.int32), torch.randn(4), .125, True, kv_format='v41', kv_global=torch.randint(0,256,(2,5,36),dtype=torch.uint8), backend=V)",
    "attn-v41-nan-scales": ("kv = torch.full((1,4,66), 0x38, dtype=torch.uint8); kv[..., 64:] = 255\n"
                            "o = dsv4rt.ops.sparse_attention(torch.randn(1,2,4,64), kv, torch.randint(0,4,(1,2,3),dtype=torch.int32), None, .125, kv_format='v41', backend=V)\n"
                            "assert o.isnan().all()"),
    "attn-v41-expanded-global": "dsv4rt.ops.sparse_attention(torch.randn(1,2,4,64), torch.zeros(1,3,66,dtype=torch.uint8), torch.randint(0,9,(1,2,4),dtype=torch.int32), None, .125, kv_format='v41', kv_global=torch.randint(0,256,(1,1,36),dtype=torch.uint8).expand(1,6,36), backend=V)",
    "attn-v41-global-without-format": "dsv4rt.ops.sparse_attention(torch.randn(1,2,4,64), torch.randn(1,8,64), torch.zeros(1,2,3,dtype=torch.int32), None, .125, kv_global=torch.zeros(1,2,36,dtype=torch.uint8), backend=V)",
    "attn-v41-kv-width": "dsv4rt.ops.sparse_attention(torch.randn(1,2,4,64), torch.zeros(1,8,64,dtype=torch.uint8), torch.zeros(1,2,3,dtype=torch.int32), None, .125, kv_format='v41', backend=V)",
    "attn-v41-kv-float": "dsv4rt.ops.sparse_attention(torch.randn(1,2,4,64), torch.randn(1,8,66), torch.zeros(1,2,3,dtype=torch.int32), None, .125, kv_format='v41', backend=V)",
    "attn-v41-D48": "dsv4rt.ops.sparse_attention(torch.randn(1,2,4,48), torch.zeros(1,8,49,dtype=torch.uint8), torch.zeros(1,2,3,dtype=torch.int32), None, .125, kv_format='v41', backend=V)",
    "attn-v41-idx-beyond-global": "dsv4rt.ops.sparse_attention(torch.randn(1,2,4,64), torch.zeros(1,3,66,dtype=torch.uint8), torch.full((1,2,3),5,dtype=torch.int32), None, .125, kv_format='v41', kv_global=torch.zeros(1,2,36,dtype=torch.uint8), backend=V)",
    "attn-v41-format-int": "dsv4rt.ops.sparse_attention(torch.randn(1,2,4,64), torch.zeros(1,3,66,dtype=torch.uint8), torch.zeros(1,2,3,dtype=torch.int32), None, .125, kv_format=1, backend=V)",
    "attn-v41-global-batch": "dsv4rt.ops.sparse_attention(torch.randn(2,2,4,64), torch.zeros(2,3,66,dtype=torch.uint8), torch.zeros(2,2,3,dtype=torch.int32), None, .125, kv_format='v41', kv_global=torch.zeros(1,2,36,dtype=torch.uint8), backend=V)",
    # indexer_topk
    "idx-S0": "dsv4rt.ops.indexer_topk(torch.randn(1,0,4,32), torch.randn(1,8,32), torch.randn(1,0,4), torch.zeros(1,0,dtype=torch.int32), 4, backend=V)",
    "idx-N0": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,0,32), torch.randn(1,2,4), torch.zeros(1,2,dtype=torch.int32), 4, backend=V)",
    "idx-H0": "dsv4rt.ops.indexer_topk(torch.randn(1,2,0,32), torch.randn(1,8,32), torch.randn(1,2,0), torch.full((1,2),8,dtype=torch.int32), 4, backend=V)",
    "idx-D0": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,0), torch.randn(1,8,0), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 4, backend=V)",
    "idx-topk-gt-N": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 50, backend=V)",
    "idx-topk-2^63": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 2**63, backend=V)",
    "idx-topk-2^31": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 2**31, backend=V)",
    "idx-topk-padding-cap": ("idx = dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 65536, backend=V)\n"
                             "assert idx.shape == (1, 2, 65536) and (idx[..., 8:] == -1).all() and (idx[..., :8] >= 0).all()"),
    "idx-topk-N-beyond-cap": ("idx = dsv4rt.ops.indexer_topk(torch.randn(1,1,2,4), torch.randn(1,70000,4), torch.rand(1,1,2), torch.full((1,1),70000,dtype=torch.int32), 70000, backend=V)\n"
                              "assert idx.shape == (1, 1, 70000) and idx.sort().values.flatten().tolist() == list(range(70000))"),
    "idx-visible-gt-N": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),9,dtype=torch.int32), 4, backend=V)",
    "idx-expanded-k": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,1,32).expand(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 4, backend=V)",
    "idx-nan-weights": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.full((1,2,4), float('nan')), torch.full((1,2),8,dtype=torch.int32), 4, backend=V)",
    # indexer_topk, V4.1 arguments: candidate mask, sorted output
    "idx-cand-S0": "dsv4rt.ops.indexer_topk(torch.randn(1,0,4,32), torch.randn(1,8,32), torch.randn(1,0,4), torch.zeros(1,0,dtype=torch.int32), 4, candidates=torch.zeros(1,0,8,dtype=torch.bool), sorted_output=True, backend=V)",
    "idx-cand-N0": ("idx = dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,0,32), torch.randn(1,2,4), torch.zeros(1,2,dtype=torch.int32), 4, None, True, candidates=torch.zeros(1,2,0,dtype=torch.bool), sorted_output=True, backend=V)[0]\n"
                    "assert (idx == -1).all()"),
    "idx-cand-none-true": ("idx, sc = dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 4, None, True, candidates=torch.zeros(1,2,8,dtype=torch.bool), sorted_output=True, backend=V)\n"
                           "assert (idx == -1).all() and (sc == float('-inf')).all()"),
    "idx-cand-expanded": ("idx = dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 4, candidates=torch.tensor([True,False]*4).expand(1,2,8), sorted_output=True, backend=V)\n"
                          "assert (idx % 2 == 0).all() and torch.equal(idx, torch.tensor([[[0, 2, 4, 6]] * 2], dtype=torch.int32))"),
    "idx-cand-transposed": ("m = (torch.arange(16).view(1,8,2) % 3 == 0).transpose(1,2)\n"
                            "idx = dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 8, candidates=m, sorted_output=True, backend=V)\n"
                            "assert all(idx[0, r][idx[0, r] >= 0].tolist() == m[0, r].nonzero().flatten().tolist() for r in range(2)), idx"),
    "idx-cand-uint8": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 4, candidates=torch.ones(1,2,8,dtype=torch.uint8), backend=V)",
    "idx-cand-shape": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 4, candidates=torch.ones(1,2,9,dtype=torch.bool), backend=V)",
    "idx-cand-list": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 4, candidates=[[[True] * 8] * 2], backend=V)",
    "idx-sorted-int": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 4, sorted_output=1, backend=V)",
    "idx-sorted-topk-gt-N": ("idx = dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 50, sorted_output=True, backend=V)\n"
                             "assert torch.equal(idx[..., :8], torch.arange(8, dtype=torch.int32).expand(1, 2, 8)) and (idx[..., 8:] == -1).all()"),
    "idx-cand-inf-keys-H3": ("k = torch.rand(1,9,4) + .5; k[0, [1, 4], 0] = float('inf'); q = torch.zeros(1,2,3,4); q[..., 0] = 1.0\n"
                             "idx = dsv4rt.ops.indexer_topk(q, k, torch.ones(1,2,3), torch.full((1,2),9,dtype=torch.int32), 2, candidates=torch.ones(1,2,9,dtype=torch.bool), sorted_output=True, backend=V)\n"
                             "assert idx.tolist() == [[[1, 4], [1, 4]]], idx"),
    # indexer_scores (the whole score matrix)
    "scores-S0": "dsv4rt.ops.indexer_scores(torch.randn(1,0,4,32), torch.randn(1,8,32), torch.randn(1,0,4), torch.zeros(1,0,dtype=torch.int32), backend=V)",
    "scores-N0": ("sc = dsv4rt.ops.indexer_scores(torch.randn(1,2,4,32), torch.randn(1,0,32), torch.randn(1,2,4), torch.zeros(1,2,dtype=torch.int32), backend=V)\n"
                  "assert sc.shape == (1, 2, 0)"),
    "scores-H0": ("sc = dsv4rt.ops.indexer_scores(torch.randn(1,2,0,32), torch.randn(1,8,32), torch.randn(1,2,0), torch.tensor([[3, 8]],dtype=torch.int32), backend=V)\n"
                  "assert (sc[0, 0, :3] == 0).all() and (sc[0, 0, 3:] == float('-inf')).all() and (sc[0, 1] == 0).all()"),
    "scores-D0": ("sc = dsv4rt.ops.indexer_scores(torch.randn(1,2,4,0), torch.randn(1,8,0), torch.randn(1,2,4), torch.full((1,2),5,dtype=torch.int32), backend=V)\n"
                  "assert (sc[..., :5] == 0).all() and (sc[..., 5:] == float('-inf')).all()"),
    "scores-nan-weights": ("sc = dsv4rt.ops.indexer_scores(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.full((1,2,4), float('nan')), torch.full((1,2),8,dtype=torch.int32), backend=V)\n"
                           "assert (sc == float('-inf')).all()"),
    "scores-inf-keys-H3": ("k = torch.rand(1,9,4) + .5; k[0, [1, 4], 0] = float('inf'); q = torch.zeros(1,2,3,4); q[..., 0] = 1.0\n"
                           "sc = dsv4rt.ops.indexer_scores(q, k, torch.ones(1,2,3), torch.full((1,2),9,dtype=torch.int32), backend=V)\n"
                           "assert (sc[..., [1, 4]] == float('inf')).all() and sc[..., [0, 2, 3]].isfinite().all()"),
    "scores-expanded-k": "dsv4rt.ops.indexer_scores(torch.randn(1,2,4,32), torch.randn(1,1,32).expand(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), backend=V)",
    "scores-transposed-q": "dsv4rt.ops.indexer_scores(torch.randn(1,4,2,32).transpose(1,2), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), backend=V)",
    "scores-visible-gt-N": "dsv4rt.ops.indexer_scores(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),9,dtype=torch.int32), backend=V)",
    "scores-visible-int64": "dsv4rt.ops.indexer_scores(torch.randn(1,2,4,32), torch.randn(1,8,32), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int64), backend=V)",
    # MXFP4 keys (uint8 E2M1 pairs [B, N, D/2] + E8M0 [B, N, D/32]) on indexer_topk and indexer_scores
    "mx-random-bytes": ("k = torch.randint(0,256,(1,8,32),dtype=torch.uint8); s = torch.randint(120,134,(1,8,2),dtype=torch.uint8)\n"
                        "sc = dsv4rt.ops.indexer_scores(torch.randn(1,2,4,64), k, torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), s, backend=V)\n"
                        "assert sc.isfinite().all()\n"
                        "idx = dsv4rt.ops.indexer_topk(torch.randn(1,2,4,64), k, torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 3, s, sorted_output=True, backend=V)\n"
                        "assert (idx >= 0).all()"),
    "mx-scale-bytes-0-and-254": ("s = torch.zeros(1,8,1,dtype=torch.uint8); s[0, 4:] = 254\n"
                                 "dsv4rt.ops.indexer_scores(torch.randn(1,2,4,32), torch.randint(0,256,(1,8,16),dtype=torch.uint8), torch.rand(1,2,4), torch.full((1,2),8,dtype=torch.int32), s.view(torch.float8_e8m0fnu), backend=V)"),
    "mx-scale-nan": "dsv4rt.ops.indexer_scores(torch.randn(1,2,4,32), torch.zeros(1,8,16,dtype=torch.uint8), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), torch.full((1,8,1),255,dtype=torch.uint8), backend=V)",
    "mx-topk-scale-nan": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.zeros(1,8,16,dtype=torch.uint8), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 4, torch.full((1,8,1),255,dtype=torch.uint8), backend=V)",
    "mx-D48": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,48), torch.zeros(1,8,24,dtype=torch.uint8), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 4, torch.full((1,8,1),127,dtype=torch.uint8), backend=V)",
    "mx-scale-float": "dsv4rt.ops.indexer_scores(torch.randn(1,2,4,32), torch.zeros(1,8,16,dtype=torch.uint8), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), torch.ones(1,8,1), backend=V)",
    "mx-without-scale": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.zeros(1,8,16,dtype=torch.uint8), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 4, backend=V)",
    "mx-N0": ("idx = dsv4rt.ops.indexer_topk(torch.randn(1,2,4,32), torch.zeros(1,0,16,dtype=torch.uint8), torch.randn(1,2,4), torch.zeros(1,2,dtype=torch.int32), 4, torch.zeros(1,0,1,dtype=torch.uint8), sorted_output=True, backend=V)\n"
              "assert (idx == -1).all()"),
    "mx-S0": "dsv4rt.ops.indexer_scores(torch.randn(1,0,4,32), torch.zeros(1,8,16,dtype=torch.uint8), torch.randn(1,0,4), torch.zeros(1,0,dtype=torch.int32), torch.full((1,8,1),127,dtype=torch.uint8), backend=V)",
    "mx-expanded-scale": "dsv4rt.ops.indexer_topk(torch.randn(1,2,4,64), torch.randint(0,256,(1,8,32),dtype=torch.uint8), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), 4, torch.full((1,1,1),127,dtype=torch.uint8).expand(1,8,2), backend=V)",
    "mx-transposed-k": "dsv4rt.ops.indexer_scores(torch.randn(1,2,4,64), torch.randint(0,256,(1,32,8),dtype=torch.uint8).transpose(1,2), torch.randn(1,2,4), torch.full((1,2),8,dtype=torch.int32), torch.full((1,8,2),127,dtype=torch.uint8), backend=V)",
    # select_candidate_blocks
    "blocks-S0": "dsv4rt.ops.select_candidate_blocks(torch.randn(1,0,16), torch.zeros(1,0,dtype=torch.int32), 4, 2, backend=V)",
    "blocks-B0": "dsv4rt.ops.select_candidate_blocks(torch.randn(0,2,16), torch.zeros(0,2,dtype=torch.int32), 4, 2, backend=V)",
    "blocks-N0": ("m = dsv4rt.ops.select_candidate_blocks(torch.randn(1,2,0), torch.zeros(1,2,dtype=torch.int32), 8, 2048, backend=V)\n"
                  "assert m.shape == (1, 2, 0) and m.dtype == torch.bool"),
    "blocks-all-minus-inf": ("m = dsv4rt.ops.select_candidate_blocks(torch.full((1,3,10), float('-inf')), torch.tensor([[0, 1, 10]], dtype=torch.int32), 4, 2, backend=V)\n"
                             "assert m.tolist() == [[[False] * 10, [True] * 4 + [False] * 6, [False] * 8 + [True] * 2]], m"),
    "blocks-nan": ("sc = torch.randn(1,2,12); sc[0, 0, :4] = float('nan'); sc[0, 1] = float('nan')\n"
                   "m = dsv4rt.ops.select_candidate_blocks(sc, torch.tensor([[12, 12]], dtype=torch.int32), 4, 3, backend=V)\n"
                   "assert m[0, 0].tolist() == [False] * 4 + [True] * 8 and m[0, 1].tolist() == [False] * 8 + [True] * 4, m"),
    "blocks-plus-inf": ("sc = torch.randn(1,1,16); sc[0, 0, 1] = float('inf')\n"
                        "m = dsv4rt.ops.select_candidate_blocks(sc, torch.tensor([[16]], dtype=torch.int32), 4, 2, backend=V)\n"
                        "assert m[0, 0].tolist() == [True] * 4 + [False] * 8 + [True] * 4, m"),
    "blocks-huge-block": ("m = dsv4rt.ops.select_candidate_blocks(torch.randn(1,2,5), torch.tensor([[0, 5]], dtype=torch.int32), 2**31 - 1, 1, backend=V)\n"
                          "assert m[0, 1].all() and m[0, 0].all()"),
    "blocks-huge-keep": ("m = dsv4rt.ops.select_candidate_blocks(torch.randn(1,2,9), torch.tensor([[9, 3]], dtype=torch.int32), 2, 2**31 - 1, backend=V)\n"
                         "assert m.all()"),
    "blocks-expanded": "dsv4rt.ops.select_candidate_blocks(torch.randn(1,1,16).expand(1,3,16), torch.tensor([[16]], dtype=torch.int32).expand(1,3), 4, 2, backend=V)",
    "blocks-transposed": "dsv4rt.ops.select_candidate_blocks(torch.randn(1,16,3).transpose(1,2), torch.full((1,3),16,dtype=torch.int32), 4, 2, backend=V)",
    "blocks-len-int64": "dsv4rt.ops.select_candidate_blocks(torch.randn(1,2,16), torch.full((1,2),16,dtype=torch.int64), 4, 2, backend=V)",
    "blocks-len-beyond-N": "dsv4rt.ops.select_candidate_blocks(torch.randn(1,2,16), torch.full((1,2),17,dtype=torch.int32), 4, 2, backend=V)",
    "blocks-block-float": "dsv4rt.ops.select_candidate_blocks(torch.randn(1,2,16), torch.full((1,2),16,dtype=torch.int32), 4.0, 2, backend=V)",
    "blocks-keep-2^63": "dsv4rt.ops.select_candidate_blocks(torch.randn(1,2,16), torch.full((1,2),16,dtype=torch.int32), 4, 2**63, backend=V)",
    # fp4_gemm / grouped / fp8
    "gemm-M0": f"dsv4rt.ops.fp4_gemm(torch.randn(0,64), {_w4(8, 64)}, backend=V)",
    "gemm-N0": f"dsv4rt.ops.fp4_gemm(torch.randn(3,64), {_w4(0, 64)}, backend=V)",
    "gemm-K0": f"dsv4rt.ops.fp4_gemm(torch.randn(3,0), {_w4(8, 0)}, backend=V)",
    "gemm-K48": f"dsv4rt.ops.fp4_gemm(torch.randn(3,48), torch.zeros(8,24,{U8}), torch.full((8,1),127,{U8}), backend=V)",
    "gemm-e8m0-255": f"dsv4rt.ops.fp4_gemm(torch.randn(3,64), {_w4(8, 64, 255)}, backend=V)",
    "gemm-e8m0-0": f"dsv4rt.ops.fp4_gemm(torch.randn(3,64), {_w4(8, 64, 0)}, backend=V)",
    "gemm-x-inf-fp8": f"dsv4rt.ops.fp4_gemm(torch.full((3,128), float('inf')), {_w4(8, 128)}, 'fp8', backend=V)",
    "gemm-x-transposed": f"dsv4rt.ops.fp4_gemm(torch.randn(64,3).t(), {_w4(8, 64)}, backend=V)",
    "gemm-x-expanded": f"dsv4rt.ops.fp4_gemm(torch.randn(1,64).expand(5,64), {_w4(8, 64)}, backend=V)",
    "ggemm-R0": "dsv4rt.ops.fp4_grouped_gemm(torch.randn(0,64), torch.zeros(2,8,32,dtype=torch.uint8), torch.full((2,8,2),127,dtype=torch.uint8), torch.zeros(3,dtype=torch.int32), backend=V)",
    "ggemm-E0": "dsv4rt.ops.fp4_grouped_gemm(torch.randn(0,64), torch.zeros(0,8,32,dtype=torch.uint8), torch.full((0,8,2),127,dtype=torch.uint8), torch.zeros(1,dtype=torch.int32), backend=V)",
    "ggemm-offsets-non-monotone": "dsv4rt.ops.fp4_grouped_gemm(torch.randn(4,64), torch.zeros(2,8,32,dtype=torch.uint8), torch.full((2,8,2),127,dtype=torch.uint8), torch.tensor([0,3,2],dtype=torch.int32), backend=V)",
    "ggemm-offsets-strided": "dsv4rt.ops.fp4_grouped_gemm(torch.randn(4,64), torch.zeros(2,8,32,dtype=torch.uint8), torch.full((2,8,2),127,dtype=torch.uint8), torch.tensor([0,9,2,9,4,9],dtype=torch.int32)[::2], backend=V)",
    "ggemm-offsets-int64": "dsv4rt.ops.fp4_grouped_gemm(torch.randn(4,64), torch.zeros(2,8,32,dtype=torch.uint8), torch.full((2,8,2),127,dtype=torch.uint8), torch.tensor([0,2,4]), backend=V)",
    "fp8-K0": "dsv4rt.ops.fp8_gemm(torch.randn(3,0), torch.zeros(8,0).to(torch.float8_e4m3fn), torch.ones(1,0), backend=V)",
    "fp8-M0": "dsv4rt.ops.fp8_gemm(torch.randn(0,128), torch.zeros(8,128).to(torch.float8_e4m3fn), torch.ones(1,1), backend=V)",
    "fp8-scale-nan": "dsv4rt.ops.fp8_gemm(torch.randn(3,128), torch.zeros(8,128).to(torch.float8_e4m3fn), torch.full((1,1), float('nan')), backend=V)",
    # V4.1 block sizes: fp8_gemm block_size=32, the fp4 GEMMs' act_block_size=32
    "fp8-bs32-M0": "dsv4rt.ops.fp8_gemm(torch.randn(0,64), torch.zeros(40,64).to(torch.float8_e4m3fn), torch.ones(2,2), None, 32, backend=V)",
    "fp8-bs32-K0": "dsv4rt.ops.fp8_gemm(torch.randn(3,0), torch.zeros(8,0).to(torch.float8_e4m3fn), torch.ones(1,0), block_size=32, backend=V)",
    "fp8-bs32-ragged": "dsv4rt.ops.fp8_gemm(torch.randn(3,45), torch.randn(33,45).to(torch.float8_e4m3fn), torch.ones(2,2), 'fp8', 32, backend=V)",
    "fp8-bs32-e8m0-extremes": "dsv4rt.ops.fp8_gemm(torch.randn(16,64) * 1e-20, torch.randn(64,64).to(torch.float8_e4m3fn), torch.tensor([[0,254],[254,0]],dtype=torch.uint8).view(torch.float8_e8m0fnu), None, 32, backend=V)",
    "fp8-bs32-x-inf-fp8": ("y = dsv4rt.ops.fp8_gemm(torch.full((3,96), float('inf')), torch.randn(40,96).to(torch.float8_e4m3fn), torch.ones(2,3), 'fp8', 32, backend=V)\n"
                           "assert y.isnan().all()"),
    "fp8-bs32-x-transposed": "dsv4rt.ops.fp8_gemm(torch.randn(64,3).t(), torch.randn(40,64).to(torch.float8_e4m3fn), torch.ones(2,2), None, 32, backend=V)",
    "fp8-bs32-nan-codes-prefill": ("y = dsv4rt.ops.fp8_gemm(torch.randn(16,64).bfloat16(), torch.full((40,64),0x7F,dtype=torch.uint8).view(torch.float8_e4m3fn), torch.ones(2,2), 'fp8', 32, backend=V)\n"
                                   "assert y.isnan().all()"),
    "fp8-bs32-scale-128-shape": "dsv4rt.ops.fp8_gemm(torch.randn(3,256), torch.zeros(64,256).to(torch.float8_e4m3fn), torch.ones(1,2), block_size=32, backend=V)",
    "fp8-block-64": "dsv4rt.ops.fp8_gemm(torch.randn(3,128), torch.zeros(64,128).to(torch.float8_e4m3fn), torch.ones(1,1), block_size=64, backend=V)",
    "fp8-block-float": "dsv4rt.ops.fp8_gemm(torch.randn(3,128), torch.zeros(64,128).to(torch.float8_e4m3fn), torch.ones(4,4), block_size=32.0, backend=V)",
    "gemm-ab32-K96": f"dsv4rt.ops.fp4_gemm(torch.randn(2,96), {_w4(8, 96)}, 'fp8', 32, backend=V)",
    "gemm-ab32-x-inf-fp8": (f"y = dsv4rt.ops.fp4_gemm(torch.full((3,128), float('inf')), {_w4(8, 128)}, 'fp8', 32, backend=V)\n"
                            "assert y.isnan().all()"),
    "gemm-ab64": f"dsv4rt.ops.fp4_gemm(torch.randn(3,128), {_w4(8, 128)}, 'fp8', 64, backend=V)",
    "ggemm-ab32-R0": "dsv4rt.ops.fp4_grouped_gemm(torch.randn(0,64), torch.zeros(2,8,32,dtype=torch.uint8), torch.full((2,8,2),127,dtype=torch.uint8), torch.zeros(3,dtype=torch.int32), 'fp8', 32, backend=V)",
    # MoE
    "dispatch-T0": "dsv4rt.ops.moe_dispatch(torch.randn(0,16), torch.zeros(0,2,dtype=torch.int32), 4, backend=V)",
    "dispatch-H0": "dsv4rt.ops.moe_dispatch(torch.randn(3,0), torch.zeros(3,2,dtype=torch.int32), 4, backend=V)",
    "dispatch-ids-out-of-range": "dsv4rt.ops.moe_dispatch(torch.randn(3,8), torch.full((3,2),4,dtype=torch.int32), 4, backend=V)",
    "dispatch-experts-2^63": "dsv4rt.ops.moe_dispatch(torch.randn(3,8), torch.zeros(3,2,dtype=torch.int32), 2**63, backend=V)",
    "dispatch-experts-2^40": "dsv4rt.ops.moe_dispatch(torch.randn(3,8), torch.zeros(3,2,dtype=torch.int32), 2**40, backend=V)",
    "dispatch-requires-grad": "dsv4rt.ops.moe_dispatch(torch.randn(3,8, requires_grad=True), torch.zeros(3,2,dtype=torch.int32), 4, backend=V)",
    "combine-T0": "dsv4rt.ops.moe_combine(torch.randn(0,16), torch.zeros(0,dtype=torch.int32), torch.zeros(0,2), backend=V)",
    "combine-float4": "dsv4rt.ops.moe_combine(torch.zeros(8,8,dtype=torch.float4_e2m1fn_x2), torch.randperm(8).int(), None, 2, backend=V)",
    "combine-topk-2^63": "dsv4rt.ops.moe_combine(torch.zeros(8,8), torch.randperm(8).int(), None, 2**63, backend=V)",
    "combine-src-repeated": "dsv4rt.ops.moe_combine(torch.zeros(4,8), torch.zeros(4,dtype=torch.int32), None, 2, backend=V)",
    "route-T0": "dsv4rt.ops.moe_route(torch.randn(0,8), None, 2, 1.0, backend=V)",
    "route-topk-gt-E": "dsv4rt.ops.moe_route(torch.randn(3,8), None, 9, 1.0, backend=V)",
    "route-nan-logits": "dsv4rt.ops.moe_route(torch.full((3,8), float('nan')), None, 2, 1.0, backend=V)",
    "route-very-negative": ("ids, w = dsv4rt.ops.moe_route(torch.full((3,8), -200.0), None, 2, 1.0, backend=V)\n"
                            "assert torch.isfinite(w).all() and torch.allclose(w.sum(1), torch.ones(3)), w"),
    "compress-S0": "dsv4rt.ops.kv_compress(torch.randn(1,0,16), torch.randn(1,0,16), torch.randn(4,16), 4, True, backend=V)",
    "compress-ratio-float": "dsv4rt.ops.kv_compress(torch.randn(1,8,16), torch.randn(1,8,16), torch.randn(4,16), 4.0, True, backend=V)",
    "compress-overlap-int": ("dsv4rt.ops.kv_compress(torch.randn(1,8,16), torch.randn(1,8,16), torch.randn(4,16), 4, True, backend=V)\n"
                             "dsv4rt.ops.kv_compress(torch.randn(1,8,16), torch.randn(1,8,16), torch.randn(4,16), 4, 1, backend=V)"),
    # kv_compress, V4.1 modes: ratio 2 without ape, ratio 1 without gate
    "compress-v41-r2-S0": "dsv4rt.ops.kv_compress(torch.randn(1,0,16), torch.randn(1,0,16), None, 2, False, backend=V)",
    "compress-v41-r1-S0": "dsv4rt.ops.kv_compress(torch.randn(1,0,16), None, None, 1, False, backend=V)",
    "compress-v41-r2-B0": "dsv4rt.ops.kv_compress(torch.randn(0,4,16), torch.randn(0,4,16), None, 2, False, backend=V)",
    "compress-v41-r2-expanded": "dsv4rt.ops.kv_compress(torch.randn(1,1,16).expand(1,8,16), torch.randn(1,8,16), None, 2, False, backend=V)",
    "compress-v41-r1-transposed": ("kv = torch.randn(1,16,8).transpose(1,2)\n"
                                   "assert torch.equal(dsv4rt.ops.kv_compress(kv, None, None, 1, False, backend=V), kv)"),
    "compress-v41-r1-inf-kv": ("kv = torch.full((1,4,16), float('inf')); kv[0, 1] = float('nan')\n"
                               "y = dsv4rt.ops.kv_compress(kv, None, None, 1, False, backend=V)\n"
                               "assert torch.equal(y.isnan(), kv.isnan()) and (y[0, [0, 2, 3]] == float('inf')).all()"),
    "compress-v41-r2-all-minus-inf": ("y = dsv4rt.ops.kv_compress(torch.randn(1,4,16), torch.full((1,4,16), float('-inf')), None, 2, False, backend=V)\n"
                                      "assert y.isnan().all()"),
    "compress-v41-r2-odd-S": "dsv4rt.ops.kv_compress(torch.randn(1,5,16), torch.randn(1,5,16), None, 2, False, backend=V)",
    "compress-v41-no-gate-r2": "dsv4rt.ops.kv_compress(torch.randn(1,4,16), None, None, 2, False, backend=V)",
    "compress-v41-no-gate-ape": "dsv4rt.ops.kv_compress(torch.randn(1,4,16), None, torch.randn(1,16), 1, False, backend=V)",
    "compress-v41-gate-list": "dsv4rt.ops.kv_compress(torch.randn(1,4,16), [[0.0]], None, 2, False, backend=V)",
}
# a clean refusal is fine everywhere; these must be refused (ContractError), never computed
MUST_REFUSE = {"attn-idx-int64", "attn-idx-out-of-range", "attn-scale-inf", "attn-v41-global-without-format",
               "attn-v41-kv-width", "attn-v41-kv-float", "attn-v41-D48", "attn-v41-idx-beyond-global",
               "attn-v41-format-int", "attn-v41-global-batch", "idx-visible-gt-N", "idx-topk-2^63",
               "idx-topk-2^31", "gemm-K48",
               "ggemm-offsets-non-monotone", "ggemm-offsets-int64", "dispatch-ids-out-of-range",
               "dispatch-experts-2^63", "dispatch-experts-2^40", "combine-float4", "combine-topk-2^63",
               "combine-src-repeated", "route-topk-gt-E", "compress-ratio-float", "compress-overlap-int",
               "fp8-scale-nan", "fp8-bs32-scale-128-shape", "fp8-block-64", "fp8-block-float", "gemm-ab64", "route-nan-logits", "idx-cand-uint8", "idx-cand-shape", "idx-cand-list",
               "idx-sorted-int", "blocks-len-int64", "blocks-len-beyond-N", "blocks-block-float", "blocks-keep-2^63", "compress-v41-r2-odd-S", "compress-v41-no-gate-r2",
               "compress-v41-no-gate-ape", "compress-v41-gate-list"}
CUDA_FAST = ("attn-S0", "attn-H0", "attn-K0", "attn-N0", "attn-v41-N0-M0", "attn-v41-random-bytes", "attn-v41-nan-scales",
             "attn-v41-expanded-global", "idx-S0", "idx-N0", "idx-H0", "idx-topk-2^63", "gemm-M0", "gemm-K0",
             "ggemm-R0", "ggemm-offsets-strided", "fp8-K0", "fp8-M0", "dispatch-T0", "combine-T0", "route-T0",
             "compress-S0", "route-very-negative", "idx-cand-N0", "idx-cand-none-true", "idx-cand-inf-keys-H3",
             "blocks-N0", "blocks-all-minus-inf", "blocks-nan", "blocks-huge-block", "compress-v41-r2-S0", "compress-v41-r1-S0",
             "compress-v41-r1-transposed", "compress-v41-r2-all-minus-inf",
             "fp8-bs32-K0", "fp8-bs32-ragged", "fp8-bs32-x-inf-fp8", "gemm-ab32-x-inf-fp8", "ggemm-ab32-R0")
MUST_REFUSE |= {"scores-visible-gt-N", "scores-visible-int64", "mx-scale-nan", "mx-topk-scale-nan", "mx-D48",
                "mx-scale-float", "mx-without-scale"}
CUDA_FAST += ("scores-N0", "scores-H0", "scores-D0", "scores-nan-weights", "scores-inf-keys-H3", "mx-random-bytes",
              "mx-N0", "mx-scale-nan")


def _random_attention(rng: random.Random, n: int) -> dict[str, str]:
    out = {}
    for i in range(n):
        b, s, h, d, nk, k = (rng.choice([0, 1, 2]), rng.choice([0, 1, 3]), rng.choice([0, 1, 4, 17]),
                             rng.choice([0, 8, 64]), rng.choice([0, 1, 9]), rng.choice([0, 1, 5]))
        out[f"attn-rand{i}-B{b}S{s}H{h}D{d}N{nk}K{k}"] = (
            f"idx = torch.randint(-1, max({nk}, 1), ({b},{s},{k}), dtype=torch.int32)\n"
            f"idx = torch.where(idx < {nk}, idx, -1) if {nk} else torch.full_like(idx, -1)\n"
            f"dsv4rt.ops.sparse_attention(torch.randn({b},{s},{h},{d}), torch.randn({b},{nk},{d}), idx, "
            f"torch.randn({h}), .3, True, backend=V)")
    return out


def _judge(results: dict[str, str], variants: tuple[str, ...]) -> list[str]:
    bad = []
    for key, res in results.items():
        name = key.split(" @ ")[0]
        if res.startswith(("raw", "crash", "not run")):
            bad.append(f"{key}: {res}")
        elif name in MUST_REFUSE and not (res.startswith("dsv4rt ContractError")
                                          or res.startswith("dsv4rt NoImplementationError")):
            bad.append(f"{key}: must be refused with a ContractError, got {res}")
    return bad


def test_cpu_variants_never_crash_or_raise_raw(fuzz_full):
    cases = dict(EDGE)
    if fuzz_full:
        cases.update(_random_attention(random.Random(0), 150))
    todo = {f"{name} @ {v}": (v, code) for name, code in cases.items() for v in CPU_VARIANTS}
    results = run_cases(todo, env={"DSV4RT_CHECK_VALUES": "always"})
    bad = _judge(results, CPU_VARIANTS)
    assert not bad, "\n".join(bad)


def test_cuda_variants_under_the_interpreter(fuzz_full):
    pytest.importorskip("triton", reason="Triton is not installed: the cuda/triton fuzz cases need its interpreter")
    names = EDGE if fuzz_full else {n: EDGE[n] for n in CUDA_FAST}
    todo = {f"{name} @ {v}": (v, code) for name, code in names.items() for v in ("cuda/triton",)}
    results = run_cases(todo, env={"DSV4RT_TRITON_INTERPRET": "1", "DSV4RT_CHECK_VALUES": "always"})
    bad = _judge(results, ("cuda/triton",))
    assert not bad, "\n".join(bad)
