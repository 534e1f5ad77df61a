"""MoE family: moe_route, moe_dispatch, moe_combine (docs/deepseek-v4.md section 5)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from . import _check as c
from ..spec import OutputSpec, declare_spec

FAMILY = "moe"
SCORE_FUNCS = ("sqrtsoftplus",)
COMBINE_DTYPES = c.FLOAT_ACT + (torch.float64,)


def moe_route(logits: Tensor, bias: Tensor | None, topk: int, route_scale: float,
              score_func: str = "sqrtsoftplus", hash_ids: Tensor | None = None, bias_alt: Tensor | None = None,
              use_alt: Tensor | None = None, weight_eps: float = 0.0) -> tuple[Tensor, Tensor]:
    """(ids[T, topk] int32, weights[T, topk] float32): the router of V4 (spec 5.1) and V4.1 (Gate.forward).

    - ``logits``: [T, E] float32 (``x @ W_gate^T`` in fp32); ``s = sqrt(softplus(logits))``
      (softplus linear above 20).
    - Score-routed layers: ``ids = topk(s + b_t)`` over all E experts, where the selection bias of token t
      is ``b_t = bias_alt if use_alt[t] else bias`` (``bias`` [E] float32 or None = 0; used for selection
      only). V4.1's per-token selector: ``bias_alt`` [E] float32 (the checkpoint's ``gate.bias_vl``) and
      ``use_alt`` [T] bool (True for image-span tokens, ``token_types >= 0``) come together, need ``bias``,
      and are None for V4 and for text-only calls.
    - Hash layers (V4 only): ``hash_ids`` [T, topk] int32/int64 (``tid2eid[token]``) are the ids;
      ``bias``, ``bias_alt`` and ``use_alt`` must then be None.
    - ``weights = s[ids] / (sum(s[ids]) + weight_eps) * route_scale``: ``weight_eps`` = 0.0 for V4, 1e-20
      for V4.1 (a finite float >= 0; it matters only where the chosen scores underflow toward 1e-20). The
      order of the k choices within a row is unspecified (ties broken any way), but ``weights[t, j]``
      always belongs to ``ids[t, j]``.
    """


def moe_dispatch(x: Tensor, ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """(x_sorted[T*topk, H], offsets[E+1] int32, src[T*topk] int32): token copies grouped by expert.

    - ``x``: [T, H] any float dtype (rows are moved bit for bit, packed FP8 / FP4 rows included);
      ``ids``: [T, topk] int32 in [0, num_experts); ``1 <= num_experts <= 2^31 - 1``. An ``x`` that
      requires grad is read as detached: the ops build no autograd graph.
    - Row r of ``x_sorted`` is ``x[src[r] // topk]``; rows are grouped by expert in ascending order and
      stable in (t, j) order inside an expert; ``src[r] = t * topk + j``.
    - ``offsets[e]`` = number of (t, j) pairs routed to experts < e (offsets[0] = 0, offsets[E] = T*topk):
      the layout fp4_grouped_gemm takes.
    """


def moe_combine(y_sorted: Tensor, src: Tensor, weights: Tensor | None, topk: int | None = None) -> Tensor:
    """y[T, H]: un-permute and reduce: ``y[t] = sum_j weights[t, j] * y_sorted[r]`` where ``src[r] = t*topk + j``.

    - ``y_sorted``: [T*topk, H] float32 / bfloat16 / float16 / float64; ``src``: [T*topk] int32, a
      permutation of 0..T*topk-1 (moe_dispatch's).
    - ``weights``: [T, topk] float32, or None for an unweighted sum (then ``topk`` must be given;
      with weights, ``topk`` is weights.shape[1] and may be omitted).
    Summed in fp32; output dtype = y_sorted dtype. NaN / Inf in ``y_sorted`` or ``weights`` follow IEEE
    arithmetic (a NaN term makes its token's channel NaN; +inf and -inf terms give NaN), on every variant.
    """


def _check_route(a: Mapping[str, Any]) -> None:
    op = "moe_route"
    c.tensor(op, "logits", a["logits"], 2, (torch.float32,))
    t, e = a["logits"].shape
    c.integer(op, "topk", a["topk"], lo=1, hi=e)
    c.number(op, "route_scale", a["route_scale"], positive=True)
    c.choice(op, "score_func", a["score_func"], SCORE_FUNCS)
    if a["bias"] is not None:
        c.tensor(op, "bias", a["bias"], 1, (torch.float32,))
        c.shape(op, "bias", a["bias"], (e,), "[E]")
    if a["hash_ids"] is not None:
        for name in ("bias", "bias_alt", "use_alt"):
            if a[name] is not None:
                raise c.ContractError(op, name, "None when hash_ids is given (hash layers select by token id)",
                                      "a tensor")
        c.tensor(op, "hash_ids", a["hash_ids"], 2, (torch.int32, torch.int64))
        c.shape(op, "hash_ids", a["hash_ids"], (t, a["topk"]), "[T, topk]")
    _check_selector(a, t, e)
    c.number(op, "weight_eps", a["weight_eps"])
    if a["weight_eps"] < 0:
        raise c.ContractError(op, "weight_eps", "a finite number >= 0 (1e-20 for V4.1, 0.0 for V4)",
                              repr(a["weight_eps"]))


def _check_selector(a: Mapping[str, Any], t: int, e: int) -> None:
    """V4.1's per-token bias selector: ``bias_alt`` [E] float32 and ``use_alt`` [T] bool, both or neither."""
    op, alt, use = "moe_route", a["bias_alt"], a["use_alt"]
    if alt is None and use is None:
        return
    if use is None:
        raise c.ContractError(op, "use_alt", "a bool [T] selector when bias_alt is given", "None")
    if alt is None:
        raise c.ContractError(op, "bias_alt", "a float32 [E] bias when use_alt is given", "None")
    if a["bias"] is None:
        raise c.ContractError(op, "bias", "the text-token bias [E] when bias_alt / use_alt select per token",
                              "None")
    c.tensor(op, "bias_alt", alt, 1, (torch.float32,))
    c.shape(op, "bias_alt", alt, (e,), "[E]")
    c.tensor(op, "use_alt", use, 1, (torch.bool,))
    c.shape(op, "use_alt", use, (t,), "[T]")


def _values_route(a: Mapping[str, Any]) -> None:
    c.finite("moe_route", "logits", a["logits"])
    if a["bias"] is not None:
        c.finite("moe_route", "bias", a["bias"])
    if a["bias_alt"] is not None:
        c.finite("moe_route", "bias_alt", a["bias_alt"])
    if a["hash_ids"] is not None:
        c.index_range("moe_route", "hash_ids", a["hash_ids"], 0, a["logits"].shape[1])


def _out_route(a: Mapping[str, Any]) -> tuple[OutputSpec, ...]:
    shape = (a["logits"].shape[0], a["topk"])
    return (OutputSpec("ids", shape, torch.int32), OutputSpec("weights", shape, torch.float32))


def _check_dispatch(a: Mapping[str, Any]) -> None:
    op = "moe_dispatch"
    x = a["x"]
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
        c.tensor(op, "x", x, 2, c.FLOAT_ACT)
    c.tensor(op, "ids", a["ids"], 2, c.INDEX)
    c.shape(op, "ids", a["ids"], (x.shape[0], a["ids"].shape[1]), "[T, topk]")
    c.integer(op, "num_experts", a["num_experts"], lo=1, hi=c.MAX_INT32)   # expert ids and offsets are int32


def _values_dispatch(a: Mapping[str, Any]) -> None:
    c.index_range("moe_dispatch", "ids", a["ids"], 0, a["num_experts"])


def _out_dispatch(a: Mapping[str, Any]) -> tuple[OutputSpec, ...]:
    t, h = a["x"].shape
    r = t * a["ids"].shape[1]
    return (OutputSpec("x_sorted", (r, h), a["x"].dtype), OutputSpec("offsets", (a["num_experts"] + 1,), torch.int32),
            OutputSpec("src", (r,), torch.int32))


def _combine_topk(a: Mapping[str, Any]) -> int:
    return a["weights"].shape[1] if a["weights"] is not None else a["topk"]


def _check_combine(a: Mapping[str, Any]) -> None:
    op = "moe_combine"
    y = a["y_sorted"]
    c.tensor(op, "y_sorted", y, 2, COMBINE_DTYPES)   # summed in fp32: no packed / 8-bit formats
    r = y.shape[0]
    c.tensor(op, "src", a["src"], 1, c.INDEX)
    c.shape(op, "src", a["src"], (r,), "[T*topk] like y_sorted rows")
    if a["weights"] is None:
        if a["topk"] is None:
            raise c.ContractError(op, "topk", "an int when weights is None", "None")
        c.integer(op, "topk", a["topk"], lo=1, hi=c.MAX_INT32)   # src holds t*topk + j as int32
    else:
        c.tensor(op, "weights", a["weights"], 2, (torch.float32,))
        if a["topk"] is not None and a["topk"] != a["weights"].shape[1]:
            raise c.ContractError(op, "topk", f"None or weights.shape[1] = {a['weights'].shape[1]}", repr(a["topk"]))
    k = _combine_topk(a)
    if r % k:
        raise c.ContractError(op, "y_sorted", f"rows divisible by topk = {k}", f"{r} rows")
    if a["weights"] is not None:
        c.shape(op, "weights", a["weights"], (r // k, k), "[T, topk] with T*topk = y_sorted rows")


def _values_combine(a: Mapping[str, Any]) -> None:
    op = "moe_combine"
    src, r = a["src"], a["src"].shape[0]
    c.index_range(op, "src", src, 0, r)
    if r and int(torch.bincount(src, minlength=r).min()) != 1:  # in range, so all ones <=> a permutation
        raise c.ContractError(op, "src", f"a permutation of 0..{r - 1} (each row once)", "repeated entries")


def _out_combine(a: Mapping[str, Any]) -> tuple[OutputSpec, ...]:
    r, h = a["y_sorted"].shape
    return (OutputSpec("y", (r // _combine_topk(a), h), a["y_sorted"].dtype),)


_REF = "dsv4rt.reference:"
_CASES = "dsv4rt.conformance.cases.moe:"
MOE_ROUTE = declare_spec(moe_route, family=FAMILY, check=_check_route, outputs=_out_route, check_values=_values_route,
                         reference=_REF + "moe_route", cases=_CASES + "moe_route",
                         tolerance="dsv4rt.conformance.tolerance:route")
MOE_DISPATCH = declare_spec(moe_dispatch, family=FAMILY, check=_check_dispatch, outputs=_out_dispatch,
                            check_values=_values_dispatch, reference=_REF + "moe_dispatch",
                            cases=_CASES + "moe_dispatch", tolerance="dsv4rt.conformance.tolerance:exact")
MOE_COMBINE = declare_spec(moe_combine, family=FAMILY, check=_check_combine, outputs=_out_combine,
                           check_values=_values_combine, reference=_REF + "moe_combine",
                           cases=_CASES + "moe_combine", tolerance="dsv4rt.conformance.tolerance:combine")
SPECS = (MOE_ROUTE, MOE_DISPATCH, MOE_COMBINE)
