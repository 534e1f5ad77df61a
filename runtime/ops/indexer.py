"""Lightning indexer family: indexer_topk (docs/deepseek-v4.md section 2; V4.1's candidate mask and sorted
output, MXFP4 keys), indexer_scores (the whole score matrix: V4.1's candidate source and the tensor-parallel
partial scores) and select_candidate_blocks (V4.1's first level of the two-level top-k)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from . import _check as c
from ..spec import OutputSpec, declare_spec

FAMILY = "indexer"
KEY_DTYPES = c.FLOAT_ACT + (torch.float8_e4m3fn, torch.uint8)
MX_BLOCK = 32
"""MXFP4 keys: one E8M0 scale per 32 key elements."""
TOPK_PAD_SLOTS = 1 << 16
"""Slots a row may have beyond the N keys (all -1): ``topk <= max(N, TOPK_PAD_SLOTS)``."""


def indexer_topk(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int,
                 k_scale: Tensor | None = None, return_scores: bool = False,
                 score_dtype: torch.dtype | None = None, candidates: Tensor | None = None,
                 sorted_output: bool = False) -> Tensor:
    """idx[B, S, topk] int32: the ``topk`` best compressed keys of each query by the lightning-indexer score.

    ``score[b, s, t] = sum_h weights[b, s, h] * relu(q[b, s, h, :] . key[b, t, :])`` over keys
    ``t < visible[b, s]`` (causality is the caller's ``visible``, e.g. ``(pos + 1) // 4``).

    - ``q``: [B, S, H, D] float32 / bfloat16 / float16.
    - ``k``: [B, N, D], the same float dtypes, or torch.float8_e4m3fn with ``k_scale`` [B, N] float32
      (``key = e4m3 * k_scale[b, t]``), or MXFP4 (V4.1's 68 B/entry key cache at D = 128): uint8
      [B, N, D/2] packed E2M1, two per byte (low nibble = even element, high = odd), with ``k_scale``
      [B, N, D/32] E8M0 (float8_e8m0fnu or its uint8 bytes; byte 255, NaN, is a ContractError):
      ``key[b, t, d] = e2m1(k[b, t, d // 2] nibble) * 2^(k_scale[b, t, d // 32] - 127)``; D % 32 == 0.
      Keys are packed with :func:`dsv4rt.formats.quant_mxfp4` (the release's MXFP4 QDQ: block 32,
      ``s = 2^ceil(log2(max(amax, 6 * 2^-126) / 6))``, E2M1 round-to-nearest-even), so the packed form
      holds exactly the release's fake-quantised keys. Decoded keys are used in float32 arithmetic.
    - ``weights``: [B, S, H] float32 head weights; ``visible``: [B, S] int32 in [0, N].
    - ``topk`` >= 1. Row ``(b, s)`` holds ``min(topk, visible[b, s])`` distinct key indices and -1 in
      the remaining slots. Order within a row is unspecified; ties may be broken either way.
      ``topk <= max(N, 65536)`` and ``<= 2^31 - 1``: topk is the only output size a scalar sets, so it
      is tied to the keys. A row holds at most N keys; slots beyond N are -1 padding, allowed up to
      65536 per row (a fixed-width row while the cache is short: the model's 512 / 1024 fit).
    - ``return_scores``: also return ``scores`` [B, S, topk] float32, the score of each returned index
      (-inf where idx is -1).
    - ``score_dtype``: the precision of the score. ``None`` (default) = q's dtype, as the release (an
      einsum of bf16 q and bf16 keys, ReLU, times the head weights and summed over heads, all bf16
      tensors); ``torch.float32`` keeps every step in fp32. For a 16-bit ``score_dtype`` there are three
      rounding points, each from an fp32 (or exact) value: ``d = round(q_h . key_t)`` (fp32 accumulation),
      ``p = round(weights[h] * relu(d))``, ``score = round(sum_h p)`` (fp32 accumulation). Rounded scores
      tie more often; ties may be broken either way. ``scores`` are returned as float32.
    - NaN: a NaN score (NaN in q, a key or a weight) counts as -inf: it ranks below every number, and
      ``scores`` reports -inf for it. Infinite inputs follow IEEE arithmetic. A visible key is a candidate
      whatever its score: keys scoring -inf (or NaN) still fill the row's ``min(topk, visible)`` slots
      when fewer finite ones are visible, and only keys ``t >= visible`` (and non-candidates) are never
      returned.
    - ``candidates`` (V4.1's second level): None, or bool [B, S, N] (a mask shaped like the scores, as
      :func:`select_candidate_blocks` returns it). Key ``t`` is *selectable* by query ``(b, s)`` when
      ``t < visible[b, s]`` and ``candidates[b, s, t]``; the row then holds ``min(topk, selectable)``
      indices, all selectable, and -1 in the other slots: a non-candidate key is excluded like an invisible
      one, never returned. (The release masks non-candidates to -inf before ``torch.topk``, which would
      fill slots beyond the selectable keys with arbitrary masked positions; its candidate mask always holds
      at least ``min(index_topk, visible)`` selectable keys, so both agree there.) ``scores`` stay the
      scores of the returned keys.
    - ``sorted_output``: False (V4): order within a row unspecified. True (V4.1): the returned indices in
      ascending key order, then the -1 padding; ``scores`` follow the same order.
    V4.1 (32 heads, keys from the compressor latent) calls it with FP4-simulated, un-rotated q and k
    (MXFP4 fake-quant and any Hadamard rotation are the caller's, as for V4), weights already scaled by
    ``128^-0.5 * 32^-0.5``, and ``score_dtype`` None with bf16 q (its score is the same bf16 einsum as V4's).
    Per-head scores are never materialised by fused backends.
    """


def is_mxfp4(k: Tensor) -> bool:
    """Whether an indexer call's keys are MXFP4 (packed uint8 E2M1 with per-32 E8M0 ``k_scale``)."""
    return k.dtype == torch.uint8


def _check_keys(op: str, a: Mapping[str, Any], b: int, d: int) -> int:
    """The three key forms (float, E4M3 + per-key scale, MXFP4 + per-32 E8M0 scale); returns N."""
    k, ks = a["k"], a["k_scale"]
    c.tensor(op, "k", k, 3, KEY_DTYPES)
    n = k.shape[1]
    if is_mxfp4(k):
        if d % MX_BLOCK:
            raise c.ContractError(op, "k", f"float keys (MXFP4 keys need D % {MX_BLOCK} == 0)",
                                  f"uint8 MXFP4 keys with D = {d}")
        c.shape(op, "k", k, (b, n, d // 2), "[B, N, D/2] (packed E2M1)")
        if ks is None:
            raise c.ContractError(op, "k_scale", "a [B, N, D/32] E8M0 tensor when k is uint8 (MXFP4)", "None")
        c.tensor(op, "k_scale", ks, 3, c.E8M0)
        c.shape(op, "k_scale", ks, (b, n, d // MX_BLOCK), "[B, N, D/32]")
        return n
    c.shape(op, "k", k, (b, n, d), "[B, N, D]")
    if k.dtype == torch.float8_e4m3fn:
        if ks is None:
            raise c.ContractError(op, "k_scale", "a [B, N] float32 tensor when k is float8_e4m3fn", "None")
        c.tensor(op, "k_scale", ks, 2, (torch.float32,))
        c.shape(op, "k_scale", ks, (b, n), "[B, N]")
    elif ks is not None:
        raise c.ContractError(op, "k_scale", "None when k holds float keys (a scale goes with float8_e4m3fn or "
                              "uint8 MXFP4 keys)", f"a tensor (k is {k.dtype})")
    return n


def _check_common(op: str, a: Mapping[str, Any]) -> int:
    """q, the keys, weights and visible of indexer_topk / indexer_scores; returns N."""
    c.tensor(op, "q", a["q"], 4, c.FLOAT_ACT)
    b, s, h, d = a["q"].shape
    n = _check_keys(op, a, b, d)
    c.tensor(op, "weights", a["weights"], 3, (torch.float32,))
    c.shape(op, "weights", a["weights"], (b, s, h), "[B, S, H]")
    c.tensor(op, "visible", a["visible"], 2, c.INDEX)
    c.shape(op, "visible", a["visible"], (b, s), "[B, S]")
    return n


def _check(a: Mapping[str, Any]) -> None:
    op = "indexer_topk"
    n = _check_common(op, a)
    b, s = a["q"].shape[:2]
    c.integer(op, "topk", a["topk"], lo=1)
    hi = min(max(n, TOPK_PAD_SLOTS), c.MAX_INT32)
    if a["topk"] > hi:
        raise c.ContractError(op, "topk", f"an int in [1, {hi}] (at most max(N, {TOPK_PAD_SLOTS}) and 2^31 - 1: a "
                              f"row holds at most N = {n} keys, slots beyond them are -1 padding)", repr(a["topk"]))
    c.flag(op, "return_scores", a["return_scores"])
    c.choice(op, "score_dtype", a["score_dtype"], SCORE_DTYPES)
    if a.get("candidates") is not None:
        c.tensor(op, "candidates", a["candidates"], 3, (torch.bool,))
        c.shape(op, "candidates", a["candidates"], (b, s, n), "[B, S, N]")
    c.flag(op, "sorted_output", a.get("sorted_output", False))


SCORE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def score_dtype_of(a: Mapping[str, Any]) -> torch.dtype:
    """The effective score dtype of an indexer_topk call (``score_dtype``, or q's dtype when None)."""
    return a["q"].dtype if a.get("score_dtype") is None else a["score_dtype"]


def _values_of(op: str, a: Mapping[str, Any]) -> None:
    c.index_range(op, "visible", a["visible"], 0, a["k"].shape[1] + 1)
    if a["k_scale"] is None:
        return
    if is_mxfp4(a["k"]):
        c.e8m0_finite(op, "k_scale", a["k_scale"])
    else:
        c.finite(op, "k_scale", a["k_scale"])


def _values(a: Mapping[str, Any]) -> None:
    _values_of("indexer_topk", a)


def _outputs(a: Mapping[str, Any]) -> tuple[OutputSpec, ...]:
    b, s = a["q"].shape[:2]
    out = (OutputSpec("idx", (b, s, a["topk"]), torch.int32),)
    if a["return_scores"]:
        out += (OutputSpec("scores", (b, s, a["topk"]), torch.float32),)
    return out


INDEXER_TOPK = declare_spec(indexer_topk, family=FAMILY, check=_check, outputs=_outputs, check_values=_values,
                            reference="dsv4rt.reference:indexer_topk",
                            cases="dsv4rt.conformance.cases.indexer:indexer_topk",
                            tolerance="dsv4rt.conformance.tolerance:topk")


def indexer_scores(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, k_scale: Tensor | None = None,
                   score_dtype: torch.dtype | None = None) -> Tensor:
    """scores[B, S, N] float32: the lightning-indexer score of every key for every query, the matrix
    :func:`indexer_topk` ranks (V4.1's candidate source hands it to :func:`select_candidate_blocks`; the
    tensor-parallel indexer sums each rank's partial matrix over its heads before the top-k).

    ``scores[b, s, t] = sum_h weights[b, s, h] * relu(q[b, s, h, :] . key[b, t, :])`` for
    ``t < visible[b, s]``, and ``-inf`` for ``t >= visible[b, s]`` (the release's prefill mask).

    - ``q``, ``k``, ``k_scale``, ``weights``, ``visible``: exactly as :func:`indexer_topk` (float keys, E4M3
      keys with a per-key float32 scale, or MXFP4 keys: uint8 [B, N, D/2] with E8M0 ``k_scale``
      [B, N, D/32]).
    - ``score_dtype``: as :func:`indexer_topk`: None (default) = q's dtype (the release's bf16 einsum); for a
      16-bit dtype the same three rounding points (``round(q_h . key_t)``, ``round(w_h * relu(.))``,
      ``round(sum_h .)``, each from an fp32 or exact value); the result is returned as float32 either way.
    - NaN: a NaN score (NaN in q, a key or a weight) is returned as -inf, as :func:`indexer_topk` ranks it.
      Infinite inputs follow IEEE arithmetic (+inf scores stay +inf).
    Memory: O(B * S * N) for the output; per-head scores ``[B, S, H, N]`` are never materialised (backends
    score a chunk of queries or keys at a time, or fuse the head sum).
    """


def _scores_check(a: Mapping[str, Any]) -> None:
    op = "indexer_scores"
    _check_common(op, a)
    c.choice(op, "score_dtype", a["score_dtype"], SCORE_DTYPES)


def _scores_values(a: Mapping[str, Any]) -> None:
    _values_of("indexer_scores", a)


def _scores_outputs(a: Mapping[str, Any]) -> tuple[OutputSpec, ...]:
    b, s = a["q"].shape[:2]
    return (OutputSpec("scores", (b, s, a["k"].shape[1]), torch.float32),)


INDEXER_SCORES = declare_spec(indexer_scores, family=FAMILY, check=_scores_check, outputs=_scores_outputs,
                              check_values=_scores_values, reference="dsv4rt.reference:indexer_scores",
                              cases="dsv4rt.conformance.cases.indexer:indexer_scores",
                              tolerance="dsv4rt.conformance.tolerance:index_scores")


def select_candidate_blocks(scores: Tensor, compress_len: Tensor, block_size: int = 8,
                            n_blocks: int = 2048) -> Tensor:
    """mask[B, S, N] bool: each query's candidate key positions, whole blocks of ``block_size`` positions
    kept by their best score (level one of V4.1's two-level top-k; the release uses block_size 8 and
    n_blocks 2048, then masks the later indexers' scores with the result: ``indexer_topk(candidates=)``).

    - ``scores``: [B, S, N] float32 / bfloat16 / float16, an indexer's scores; -inf marks a position the
      query cannot reach. The caller masks those (as the release's prefill does): the op does not mask by
      ``compress_len``. A NaN score counts as -inf.
    - ``compress_len``: [B, S] int32 in [0, N], the query's reachable length.
    - Block ``j`` holds positions ``[j * block_size, min((j + 1) * block_size, N))`` (the last one is padded
      with -inf); its score is the max of its positions' scores. The block holding the newest reachable
      position, ``(compress_len - 1) // block_size``, scores +inf (pinned: it may be only partly filled);
      no block is pinned where ``compress_len == 0``.
    - Kept: of the blocks scoring above -inf, the ``min(n_blocks, their count)`` with the largest block
      scores (ties broken either way). ``mask[b, s, t]`` is True iff ``t``'s block is kept.
    - ``block_size``, ``n_blocks``: ints in [1, 2^31 - 1].
    - NaN: the release takes the block max with ``amax`` (a NaN makes the block NaN, which its ``torch.topk``
      ranks first and then drops as not above -inf); here a NaN position only scores -inf itself.
    """


def _blocks_check(a: Mapping[str, Any]) -> None:
    op = "select_candidate_blocks"
    c.tensor(op, "scores", a["scores"], 3, c.FLOAT_ACT)
    b, s, _ = a["scores"].shape
    c.tensor(op, "compress_len", a["compress_len"], 2, c.INDEX)
    c.shape(op, "compress_len", a["compress_len"], (b, s), "[B, S]")
    c.integer(op, "block_size", a["block_size"], lo=1, hi=c.MAX_INT32)
    c.integer(op, "n_blocks", a["n_blocks"], lo=1, hi=c.MAX_INT32)


def _blocks_values(a: Mapping[str, Any]) -> None:
    c.index_range("select_candidate_blocks", "compress_len", a["compress_len"], 0, a["scores"].shape[2] + 1)


def _blocks_outputs(a: Mapping[str, Any]) -> tuple[OutputSpec, ...]:
    return (OutputSpec("mask", tuple(a["scores"].shape), torch.bool),)


SELECT_CANDIDATE_BLOCKS = declare_spec(select_candidate_blocks, family=FAMILY, check=_blocks_check,
                                       outputs=_blocks_outputs, check_values=_blocks_values,
                                       reference="dsv4rt.reference:select_candidate_blocks",
                                       cases="dsv4rt.conformance.cases.indexer:select_candidate_blocks",
                                       tolerance="dsv4rt.conformance.tolerance:candidate_blocks")
SPECS = (INDEXER_TOPK, INDEXER_SCORES, SELECT_CANDIDATE_BLOCKS)
