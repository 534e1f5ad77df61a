"""dsv4rt.reference: the float64 golden implementation of every v1 op.

The plainest reading of ``docs/deepseek-v4.md``: slow on purpose, no input validation (the op specs in
``dsv4rt.ops`` do that). Inputs are CPU torch tensors; outputs are float64, index outputs int32.
Backends are compared against these functions by the conformance runner.
"""

from .attention import kv_compress, sparse_attention
from .gemm import act_quant_fp8, act_scales_fp8, fp4_gemm, fp4_grouped_gemm, fp8_gemm
from .indexer import candidate_block_scores, indexer_scores, indexer_topk, select_candidate_blocks, selectable
from .moe import moe_combine, moe_dispatch, moe_route, moe_route_weights, moe_scores
from .engram import engram_hash, engram_lookup

# The v1 ops, by name (design.md section 2).
OPS = {
    "fp4_gemm": fp4_gemm,
    "fp4_grouped_gemm": fp4_grouped_gemm,
    "fp8_gemm": fp8_gemm,
    "indexer_topk": indexer_topk,
    "indexer_scores": indexer_scores,
    "select_candidate_blocks": select_candidate_blocks,
    "kv_compress": kv_compress,
    "sparse_attention": sparse_attention,
    "moe_route": moe_route,
    "moe_dispatch": moe_dispatch,
    "moe_combine": moe_combine,
    "engram_hash": engram_hash,
    "engram_lookup": engram_lookup,
}

__all__ = [
    *OPS,
    "OPS",
    # helpers for conformance checks
    "candidate_block_scores",
    "selectable",
    "moe_route_weights",
    "moe_scores",
    "act_quant_fp8",
    "act_scales_fp8",
]
