"""Golden MoE routing, dispatch and combine (spec section 5), float64."""

import torch

from ._decode import F64, to_f64

SOFTPLUS_THRESHOLD = 20.0   # torch.nn.functional.softplus default: linear above it


def _sqrt_softplus(logits):
    """``s = sqrt(softplus(z))`` in float64, ``softplus(z) = log1p(exp(z))`` for ``z <= 20`` and
    exactly ``z`` above (torch's softplus threshold), spec 5.1 ``sqrtsoftplus``."""
    z = to_f64(logits)
    sp = torch.where(z > SOFTPLUS_THRESHOLD, z, torch.log1p(torch.exp(torch.clamp(z, max=SOFTPLUS_THRESHOLD))))
    return torch.sqrt(sp)


def moe_scores(logits, bias, bias_alt=None, use_alt=None):
    """Selection scores ``s + b_t`` as float64 ``[T, E]`` (``s`` as in :func:`moe_route`; ``b_t`` is
    ``bias_alt`` for the tokens with ``use_alt[t]``, else ``bias``; None means 0). A valid selection is
    any ``topk`` experts of maximal selection score."""
    s = _sqrt_softplus(logits)
    if bias is None:
        return s
    b = to_f64(bias)[None, :].expand_as(s)
    if bias_alt is not None:
        b = torch.where(use_alt.to(torch.bool)[:, None], to_f64(bias_alt)[None, :], b)
    return s + b


def moe_route_weights(logits, ids, route_scale, weight_eps=0.0):
    """Routing weights for given ``ids [T, topk]``: ``w[t, j] = s[t, ids[t, j]] / (sum_j' s[t, ids[t, j']]
    + weight_eps) * route_scale`` (float64 ``[T, topk]``), ``s = sqrt(softplus(logits))`` (spec 5.1;
    V4.1's Gate adds ``weight_eps = 1e-20``). The bias never enters the weights."""
    s = _sqrt_softplus(logits)
    chosen = torch.gather(s, 1, ids.to(torch.int64))
    return chosen / (chosen.sum(dim=1, keepdim=True) + weight_eps) * route_scale


def moe_route(logits, bias, topk, route_scale, score_func="sqrtsoftplus", hash_ids=None, bias_alt=None,
              use_alt=None, weight_eps=0.0):
    """Router of spec 5.1 and V4.1's Gate: returns ``(ids [T, topk] int32, weights [T, topk] float64)``.

    * ``s = sqrt(softplus(logits))`` in float64 (softplus linear above 20, as torch's);
    * score-routed: ``ids = topk(s + b_t)`` over all experts, ``b_t = bias_alt`` where ``use_alt[t]``,
      else ``bias`` (no group limit; bias only for selection; here sorted by descending score, ties to
      the lower expert id); hash-routed (``hash_ids [T, topk]`` given): ``ids = hash_ids`` and the biases
      are unused;
    * ``weights = s[ids] / (sum(s[ids]) + weight_eps) * route_scale`` (:func:`moe_route_weights`).

    Only ``score_func="sqrtsoftplus"`` (the V4 / V4.1 router) is implemented.
    """
    if score_func != "sqrtsoftplus":
        raise NotImplementedError(f"reference: score_func={score_func!r}; v1 has only 'sqrtsoftplus'")
    if hash_ids is not None:
        ids = hash_ids.to(torch.int64)
    else:
        sel = moe_scores(logits, bias, bias_alt, use_alt)
        ids = torch.sort(sel, dim=1, descending=True, stable=True).indices[:, :topk]
    weights = moe_route_weights(logits, ids, route_scale, weight_eps)
    return ids.to(torch.int32), weights


def moe_dispatch(x, ids, num_experts):
    """Group token copies by expert: returns ``(x_sorted [T*topk, H] float64, offsets [E+1] int32,
    src [T*topk] int32)``.

    Pair ``(t, j)`` (flat id ``p = t*topk + j``) goes to expert ``ids[t, j]``. Rows are ordered by
    expert ascending and, inside an expert, by ascending ``p`` (stable in token order). Row ``r``
    holds ``x_sorted[r] = x[src[r] // topk]`` with ``src[r] = p``; ``offsets[e]`` is the number of
    pairs whose expert is ``< e``, so expert e owns rows ``offsets[e]:offsets[e+1]``.
    """
    xd = to_f64(x)
    topk = ids.shape[1]
    flat = ids.to(torch.int64).reshape(-1)
    src_list = []
    offsets = [0]
    for e in range(num_experts):
        pairs = torch.nonzero(flat == e).reshape(-1)     # ascending p
        src_list.append(pairs)
        offsets.append(offsets[-1] + pairs.numel())
    src = torch.cat(src_list) if src_list else torch.zeros(0, dtype=torch.int64)
    x_sorted = xd[src // topk]
    return x_sorted, torch.tensor(offsets, dtype=torch.int32), src.to(torch.int32)


def moe_combine(y_sorted, src, weights, topk=None):
    """Weighted scatter-add back to tokens: ``y [T, H]`` float64,
    ``y[t] = sum_j w[t, j] * y_sorted[r]`` over the rows ``r`` with ``src[r] = t*topk + j``.

    With ``weights [T, topk]`` given, ``topk = weights.shape[1]`` and ``T = weights.shape[0]``;
    with ``weights=None``, ``w = 1``, ``topk`` must be given and ``T = len(src) // topk``.
    """
    yd = to_f64(y_sorted)
    if weights is not None:
        w = to_f64(weights)
        t_count, topk = w.shape
    else:
        t_count = src.shape[0] // topk
        w = torch.ones((t_count, topk), dtype=F64)
    s64 = src.to(torch.int64)
    tok, slot = s64 // topk, s64 % topk
    y = torch.zeros((t_count, yd.shape[1]), dtype=F64)
    y.index_add_(0, tok, w[tok, slot][:, None] * yd)
    return y
