"""Calling the registry ops from the model: bound once per call signature, with a record of what ran.

The first call of each signature (op, ``use_backend`` context, registry generation, tensor shapes /
dtypes / devices / contiguity, static attributes) goes through ``op.explain`` (contract check +
selection, as ``op.resolve``); later calls go straight to the chosen implementation, so a decode step
pays one Python call per op. ``used`` records which implementation ran for every op, and how often.
"""
from __future__ import annotations

import functools
from collections import Counter
from typing import Any, Callable

import torch
from torch import Tensor

from ..registry import generation
from ..select import context_frames
from .cores import native

__all__ = ["OpCaller"]


class OpCaller:
    """``OpCaller().call("fp8_gemm", x, w, s, "fp8")``; arguments are positional, in contract order.

    ``quant`` (default True) keeps every quantisation point of the reference: FP8 activation quantisation
    on the GEMMs, the FP8 simulation of the KV nope dims and the FP4 simulation of the indexer. False
    turns them all off (a smooth model, for debugging and for exact cache-consistency tests).

    ``precision`` ("release", the default, or "fp32") sets the precision points where the released code
    computes in bf16: the per-head q norm (model glue), P before P.V (sparse_attention ``p_dtype``) and the
    indexer scores (indexer_topk ``score_dtype``). "fp32" keeps all three in fp32.
    """

    def __init__(self, quant: bool = True, precision: str = "release") -> None:
        from .functional import check_precision

        self._bound: dict[tuple, tuple[Callable[..., Any], str]] = {}
        self.calls: Counter = Counter()
        self.quant = quant
        self.precision = check_precision(precision)
        self.fp8_block = 128    # V4.1: 32 (32x32 weight blocks, per-32 activation scales on every GEMM)
        # the ops' precision points: None = the release's (P and scores in the activation dtype); fp32 mode
        self._p_dtype = None if precision == "release" else torch.float32

    def call(self, name: str, *args: Any) -> Any:
        key = (name, context_frames(), generation(),
               tuple([(type(a), a.shape, a.dtype, a.device, a.is_contiguous()) if isinstance(a, Tensor) else a
                      for a in args]))
        hit = self._bound.get(key)
        if hit is None:
            hit = self._bind(name, args)
            if len(self._bound) > 4096:
                self._bound.clear()
            self._bound[key] = hit
        fn, label = hit
        self.calls[(name, label)] += 1
        return fn(*args)

    def _bind(self, name: str, args: tuple) -> tuple[Callable[..., Any], str]:
        from .. import ops

        op = getattr(ops, name)
        choice = op.explain(*args)
        if choice.fallback_device is not None:  # the Op wrapper copies to and from the fallback device
            return op, f"{choice.impl.name} (fallback to {choice.fallback_device})"
        if choice.impl.name.startswith("cpu/native"):   # every core, though the glue holds torch on one thread
            return functools.partial(native, choice.impl.fn), choice.impl.name
        return choice.impl.fn, choice.impl.name

    def used(self) -> dict[str, dict[str, int]]:
        """op -> {implementation: calls}, in first-use order."""
        out: dict[str, dict[str, int]] = {}
        for (name, label), n in self.calls.items():
            out.setdefault(name, {})[label] = n
        return out

    def reset_counts(self) -> None:
        self.calls.clear()

    # ---- the ops, spelled out (positional, contract order) -------------------------------------------
    def fp8_gemm(self, x: Tensor, w: Tensor, s: Tensor) -> Tensor:
        if self.fp8_block != 128:
            return self.call("fp8_gemm", x, w, s, "fp8" if self.quant else None, self.fp8_block)
        return self.call("fp8_gemm", x, w, s, "fp8" if self.quant else None)

    def fp4_grouped_gemm(self, x: Tensor, w: Tensor, s: Tensor, offsets: Tensor) -> Tensor:
        if self.fp8_block != 128:
            return self.call("fp4_grouped_gemm", x, w, s, offsets, "fp8" if self.quant else None, self.fp8_block)
        return self.call("fp4_grouped_gemm", x, w, s, offsets, "fp8" if self.quant else None)

    def kv_compress(self, kv: Tensor, gate: Tensor, ape: Tensor, ratio: int, overlap: bool,
                    prev_kv: Tensor | None, prev_gate: Tensor | None) -> Tensor:
        return self.call("kv_compress", kv, gate, ape, ratio, overlap, prev_kv, prev_gate)

    def sparse_attention(self, q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor, scale: float) -> Tensor:
        return self.call("sparse_attention", q, kv, idx, sink, scale, False, self._p_dtype)

    def indexer_topk(self, q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int) -> Tensor:
        return self.call("indexer_topk", q, k, weights, visible, topk, None, False, self._p_dtype)

    def moe_route(self, logits: Tensor, bias: Tensor | None, topk: int, route_scale: float,
                  hash_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.call("moe_route", logits, bias, topk, route_scale, "sqrtsoftplus", hash_ids)

    # ---- V4.1 ------------------------------------------------------------------------------------------
    def moe_route_v41(self, logits: Tensor, bias: Tensor, topk: int, route_scale: float, bias_alt: Tensor | None,
                      use_alt: Tensor | None) -> tuple[Tensor, Tensor]:
        return self.call("moe_route", logits, bias, topk, route_scale, "sqrtsoftplus", None,
                         bias_alt if use_alt is not None else None, use_alt, 1e-20)

    def sparse_attention_v41(self, q: Tensor, kv: Tensor, idx: Tensor, sink: Tensor, scale: float,
                             kv_global: Tensor | None) -> Tensor:
        return self.call("sparse_attention", q, kv, idx, sink, scale, False, self._p_dtype, "v41", kv_global)

    def indexer_scores(self, q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, k_scale: Tensor | None) -> Tensor:
        return self.call("indexer_scores", q, k, weights, visible, k_scale, self._p_dtype)

    def indexer_topk_v41(self, q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int,
                         k_scale: Tensor | None, candidates: Tensor | None) -> Tensor:
        return self.call("indexer_topk", q, k, weights, visible, topk, k_scale, False, self._p_dtype, candidates,
                         True)

    def select_candidate_blocks(self, scores: Tensor, compress_len: Tensor, block_size: int, n_blocks: int) -> Tensor:
        return self.call("select_candidate_blocks", scores, compress_len, block_size, n_blocks)

    def engram_hash(self, window: Tensor, multipliers: Tensor, primes: Tensor, offsets: Tensor, pad_id: int) -> Tensor:
        return self.call("engram_hash", window, multipliers, primes, offsets, pad_id)

    def engram_lookup(self, ids: Tensor, weight: Tensor, scale: Tensor, out_dtype: torch.dtype) -> Tensor:
        return self.call("engram_lookup", ids, weight, scale, out_dtype)

    def moe_dispatch(self, x: Tensor, ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.call("moe_dispatch", x, ids, num_experts)

    def moe_combine(self, y: Tensor, src: Tensor, topk: int) -> Tensor:
        return self.call("moe_combine", y, src, None, topk)
