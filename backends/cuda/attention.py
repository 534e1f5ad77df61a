"""``cuda/triton`` launchers of the attention family: kv_compress and sparse_attention.

Kernels are in :mod:`dsv4rt.backends.cuda.kernels.attention`, imported (with Triton) on the first launch,
so importing this module never imports Triton. Non-contiguous inputs are handled through strides (no
copies). No launcher synchronises with the host: every launch parameter comes from shapes.

sparse_attention has two paths, chosen by :func:`plan` from shapes only:

- ``prefill``: grid (B*S, head blocks); each program streams all K selected entries of its query row
  through an online softmax, the gathered [BLOCK_K, D] kv tile shared by BLOCK_H heads (MQA);
- ``decode``: when B*S*head_blocks would leave more than half the SMs idle, the K entries are split
  across programs (split-K, about one wave) whose partial (max, sum, output) a second kernel merges
  with the sink.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from dsv4rt.backend import Registrar, new_output
from ._launch import core_count, device_guard, kernels, next_pow2, on_ascend, on_interpreter
from .capability import mma_refusal

__all__ = ["register", "kv_compress", "sparse_attention", "plan", "AttentionPlan", "supports_attention",
           "supports_compress"]

MAX_HEAD_DIM = 512
"""Largest head dim of the single-tile q / accumulator design (V4: 512)."""
INTERP_VIRTUAL_SMS = 16
"""Stand-in SM count under the interpreter, so the small conformance shapes exercise both paths
(decode: B*S*head_blocks <= 8 rows; prefill otherwise)."""


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Multiprocessor count of ``device`` (the current GPU when it has no index; an NPU's cube cores; cached,
    no sync)."""
    return core_count(device)


@dataclass(frozen=True)
class AttentionPlan:
    """How sparse_attention is launched: ``path`` is "prefill" or "decode" (split-K + combine)."""

    path: str
    splits: int
    k_per_split: int
    block_h: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int


def plan(args: Mapping[str, Any]) -> AttentionPlan:
    """Launch plan of sparse_attention for these arguments (shapes only, no device work)."""
    b, s, h, d = args["q"].shape
    k = args["idx"].shape[2]
    interp = on_interpreter(args["q"])
    block_d = max(16, next_pow2(d))
    if interp:
        block_h, block_k, warps, stages = max(16, next_pow2(h)), 32, 4, 1
        sms = INTERP_VIRTUAL_SMS
    else:
        wide = block_d > 128
        block_h = max(16, min(next_pow2(h), 32 if wide else 64))
        block_k, warps, stages = (32, 8, 2) if wide else (64, 4, 2)
        if wide and args["q"].element_size() == 4:
            block_k = 16                                   # fp32 tiles: keep the two kv stages in smem
        sms = _sm_count(args["q"].device)
    if args.get("kv_format") == "v41" and block_d >= 128:
        # the in-kernel decode gathers every element through its own byte address: at D = 512 keep the tile
        # at 16 rows over 8 warps (the GPU's wide-head warps, under the interpreter too), at D = 128 spread the
        # 64 rows over 8 warps, so nothing spills (tools/compile_check.py: at 4 warps D = 128 spilled 60 B on
        # sm_80 and 956 B on sm_90a)
        block_k, warps = (16 if block_d > 128 else block_k), 8
    programs = b * s * -(-h // block_h)
    kblocks = -(-k // block_k)
    # At D = 512 one program fills an SM's registers, so split only when the grid would leave more than
    # half the SMs idle, and then into about one wave; the fp32 partials cost a write and a read.
    if 2 * programs > sms or kblocks < 2:
        return AttentionPlan("prefill", 1, max(k, 1), block_h, block_k, block_d, warps, stages)
    want = min(kblocks, max(2, sms // programs))
    per = -(-kblocks // want) * block_k
    splits = -(-k // per)
    if splits < 2:
        return AttentionPlan("prefill", 1, max(k, 1), block_h, block_k, block_d, warps, stages)
    return AttentionPlan("decode", splits, per, block_h, block_k, block_d, warps, stages)


def sparse_attention(q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor | None, scale: float,
                     return_lse: bool = False, p_dtype: torch.dtype | None = None,
                     kv_format: str | None = None, kv_global: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``o[B, S, H, D]`` (+ ``lse[B, S, H]``): sparse MQA over the selected K=V rows plus the sink.

    Triton online softmax (fp32 statistics; P in its ``p_dtype``, by default the kv dtype for the P.V
    MMA on the tensor cores; an fp32 or other P multiplies in fp32); -1 entries are
    skipped, rows with no valid entry give zeros and ``lse = sink`` (-inf without a sink). The path
    (prefill or split-K decode) comes from :func:`plan`. ``kv_format="v41"``: the kernel gathers the packed
    FP8 window / FP4 global rows and decodes them from their bits (no whole-cache dequantisation); with a
    bf16 q the decoded rows (exact in bf16) go to the bf16 MMAs, else both MMAs run in fp32.
    """
    b, s, h, d = q.shape
    k = idx.shape[2]
    dev = q.device
    o: Tensor = new_output((b, s, h, d), q.dtype, dev)
    lse = new_output((b, s, h), torch.float32, dev) if return_lse else None
    if b * s * h == 0 or d == 0:
        return (o, lse) if return_lse else o
    p = plan({"q": q, "idx": idx, "kv_format": kv_format})
    kern = kernels("attention")
    interp = on_interpreter(q)
    lse_arg = lse if lse is not None else o
    lse_st = lse.stride() if lse is not None else (0, 0, 0)
    sink_arg = sink if sink is not None else q
    grid = (b * s, -(-h // p.block_h), p.splits)
    v41 = kv_format == "v41"
    rows_bf16 = v41 and q.dtype == torch.bfloat16          # exact: decoded values fit bf16
    row_dtype = (torch.bfloat16 if rows_bf16 else torch.float32) if v41 else kv.dtype
    pd = (q.dtype if v41 else kv.dtype) if p_dtype is None else p_dtype
    p_mode = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[pd]
    g = kv_global if v41 and kv_global is not None else kv      # stand-in: never read without global rows
    g_st = kv_global.stride() if v41 and kv_global is not None else (0, 0, 0)
    common = dict(HAS_SINK=sink is not None, HAS_LSE=return_lse, BLOCK_H=p.block_h, BLOCK_D=p.block_d)
    with device_guard(q):
        if p.path == "decode":
            ws = torch.empty((b * s * h * p.splits, d), dtype=torch.float32, device=dev)
            wsml = torch.empty((b * s * h * p.splits, 2), dtype=torch.float32, device=dev)
            out_args: tuple = (o, lse_arg, ws, wsml)
        else:
            out_args = (o, lse_arg, o, o)
        kern.sparse_attn_kernel[grid](
            q, kv, idx, sink_arg, *out_args, g, s, h, d, k, p.k_per_split, float(scale), kv.shape[1],
            *q.stride(), *kv.stride(), *idx.stride(), *o.stride(), *lse_st, *g_st,
            SPLIT=p.path == "decode", BLOCK_K=p.block_k, INTERP=interp,
            P_MODE=p_mode, P_MMA=not interp and pd == row_dtype and pd != torch.float32,
            KV41=v41, ROWS_BF16=rows_bf16, MASKED_GATHER=on_ascend(q),
            num_warps=p.num_warps, num_stages=p.num_stages, **common)
        if p.path == "decode":
            kern.sparse_attn_combine_kernel[grid[:2]](
                ws, wsml, sink_arg, o, lse_arg, s, h, d, *o.stride(), *lse_st,
                NSPLIT=p.splits, num_warps=4, **common)
    return (o, lse) if return_lse else o


def kv_compress(kv: Tensor, gate: Tensor | None, ape: Tensor | None, ratio: int, overlap: bool,
                prev_kv: Tensor | None = None, prev_gate: Tensor | None = None) -> Tensor:
    """``out[B, S/ratio, d]`` float32: per-channel gated softmax pooling (spec 3.2 / 4.1) in Triton.

    One program per (entry block, channel block, b) loads each entry's tokens as a [entries, ratio,
    channels] tile and reduces it along the token axis (plus the previous block's first-half channels
    when ``overlap``). Every kv / gate element is read once. ``ape=None`` compiles the bias out;
    ``gate=None`` (ratio 1) compiles the softmax out: the entries are the kv rows in float32.
    """
    b, s, ch = kv.shape
    nb = s // ratio
    d = ch // 2 if overlap else ch
    out = new_output((b, nb, d), torch.float32, kv.device)
    if b * nb * d == 0:
        return out
    interp = on_interpreter(kv)
    block_r = next_pow2(ratio)
    if interp:
        block_c = min(next_pow2(d), 256)
        block_j = max(1, min(next_pow2(nb), 4096 // (block_r * block_c)))
        warps = 4
    else:
        block_c = min(next_pow2(d), 128 if ratio <= 8 else 64)
        block_j = max(1, min(next_pow2(nb), 2048 // (block_r * block_c)))
        warps = 4 if block_j * block_r * block_c <= 2048 else 8
    has_gate, has_ape, has_prev = gate is not None, ape is not None, prev_kv is not None
    g = gate if has_gate else kv          # stand-ins for absent tensors: never read (their branches compile out)
    a = ape if has_ape else kv
    pkv, pg = (prev_kv, prev_gate) if has_prev else (kv, g)
    gst = g.stride() if has_gate else (0,) * 3
    ast = a.stride() if has_ape else (0,) * 2
    pst = (*pkv.stride(), *pg.stride()) if has_prev else (0,) * 6
    grid = (-(-nb // block_j), -(-d // block_c), b)
    with device_guard(kv):
        kernels("attention").kv_compress_kernel[grid](
            kv, g, a, pkv, pg, out, nb, d, *kv.stride(), *gst, *ast, *pst, *out.stride(),
            RATIO=ratio, OVERLAP=overlap, HAS_PREV=has_prev, HAS_GATE=has_gate, HAS_APE=has_ape,
            BLOCK_J=block_j, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
    return out


def supports_attention(a: Mapping[str, Any]) -> str | None:
    """None, or why cuda/triton cannot take this sparse_attention call (cuda/torch then runs it)."""
    if a.get("kv_format") != "v41" and a["q"].dtype != a["kv"].dtype:   # v41: packed bytes, decoded in the kernel
        return f"cuda/triton needs q and kv of one dtype (got {a['q'].dtype} and {a['kv'].dtype})"
    if a["q"].shape[3] > MAX_HEAD_DIM:
        return f"cuda/triton keeps a head in one tile: head dim <= {MAX_HEAD_DIM} (got {a['q'].shape[3]})"
    return mma_refusal(a["q"])


def supports_compress(a: Mapping[str, Any]) -> str | None:
    """None, or why cuda/triton cannot take this kv_compress call."""
    if a["ratio"] > 1024:
        return f"cuda/triton holds one block of tokens in a tile: ratio <= 1024 (got {a['ratio']})"
    return None


def register(registrar: Registrar, device_type: str, priority: int) -> None:
    """Register ``cuda/triton`` kv_compress and sparse_attention (no Triton import here)."""
    registrar.implement("kv_compress", "triton", kv_compress, priority=priority, device_type=device_type,
                        supports=supports_compress)
    registrar.implement("sparse_attention", "triton", sparse_attention, priority=priority,
                        device_type=device_type, supports=supports_attention)
