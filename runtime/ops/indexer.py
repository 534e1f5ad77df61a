"""Lightning indexer family: indexer_topk (docs/deepseek-v4.md section 2)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from . import _check as c
from ..spec import OutputSpec, declare_spec

FAMILY = "indexer"
KEY_DTYPES = c.FLOAT_ACT + (torch.float8_e4m3fn,)
TOPK_PAD_SLOTS = 1 << 16
"""Slots a row may have beyond the N keys (all -1): ``topk <= max(N, TOPK_PAD_SLOTS)``."""


def indexer_topk(q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int,
                 k_scale: Tensor | None = None, return_scores: bool = False,
                 score_dtype: torch.dtype | None = None) -> Tensor:
    """idx[B, S, topk] int32: the ``topk`` best compressed keys of each query by the lightning-indexer score.

    ``score[b, s, t] = sum_h weights[b, s, h] * relu(q[b, s, h, :] . key[b, t, :])`` over keys
    ``t < visible[b, s]`` (causality is the caller's ``visible``, e.g. ``(pos + 1) // 4``).

    - ``q``: [B, S, H, D] float32 / bfloat16 / float16.
    - ``k``: [B, N, D], the same float dtypes, or torch.float8_e4m3fn with ``k_scale`` [B, N] float32
      (``key = e4m3 * k_scale[b, t]``).
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
      when fewer finite ones are visible, and only keys ``t >= visible`` are never returned.
    Per-head scores are never materialised by fused backends.
    """


def _check(a: Mapping[str, Any]) -> None:
    op = "indexer_topk"
    c.tensor(op, "q", a["q"], 4, c.FLOAT_ACT)
    b, s, h, d = a["q"].shape
    c.tensor(op, "k", a["k"], 3, KEY_DTYPES)
    n = a["k"].shape[1]
    c.shape(op, "k", a["k"], (b, n, d), "[B, N, D]")
    if a["k"].dtype == torch.float8_e4m3fn:
        if a["k_scale"] is None:
            raise c.ContractError(op, "k_scale", "a [B, N] float32 tensor when k is float8_e4m3fn", "None")
        c.tensor(op, "k_scale", a["k_scale"], 2, (torch.float32,))
        c.shape(op, "k_scale", a["k_scale"], (b, n), "[B, N]")
    elif a["k_scale"] is not None:
        raise c.ContractError(op, "k_scale", "None when k is not float8_e4m3fn", f"a tensor (k is {a['k'].dtype})")
    c.tensor(op, "weights", a["weights"], 3, (torch.float32,))
    c.shape(op, "weights", a["weights"], (b, s, h), "[B, S, H]")
    c.tensor(op, "visible", a["visible"], 2, c.INDEX)
    c.shape(op, "visible", a["visible"], (b, s), "[B, S]")
    c.integer(op, "topk", a["topk"], lo=1)
    hi = min(max(n, TOPK_PAD_SLOTS), c.MAX_INT32)
    if a["topk"] > hi:
        raise c.ContractError(op, "topk", f"an int in [1, {hi}] (at most max(N, {TOPK_PAD_SLOTS}) and 2^31 - 1: a "
                              f"row holds at most N = {n} keys, slots beyond them are -1 padding)", repr(a["topk"]))
    c.flag(op, "return_scores", a["return_scores"])
    c.choice(op, "score_dtype", a["score_dtype"], SCORE_DTYPES)


SCORE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def score_dtype_of(a: Mapping[str, Any]) -> torch.dtype:
    """The effective score dtype of an indexer_topk call (``score_dtype``, or q's dtype when None)."""
    return a["q"].dtype if a.get("score_dtype") is None else a["score_dtype"]


def _values(a: Mapping[str, Any]) -> None:
    op = "indexer_topk"
    c.index_range(op, "visible", a["visible"], 0, a["k"].shape[1] + 1)
    if a["k_scale"] is not None:
        c.finite(op, "k_scale", a["k_scale"])


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
SPECS = (INDEXER_TOPK,)
