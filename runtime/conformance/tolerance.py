"""Tolerance policy: how close an output must be to the float64 reference (design.md section 6).

Bounds are elementwise and follow floating-point error analysis: the output rounding
(``u_out * |ref|``) plus the input/accumulation error scaled by the same computation on absolute values
(``sum |x||w|`` for a GEMM, ``sum p |v|`` for pooling), so tolerances grow with reduction length and
magnitude but never hide a wrong element. NaN anywhere the reference is finite fails.

Unit round-offs: ``U_OUT`` is the output rounding allowance per dtype; fp32 inputs may go through
TF32 tensor-core products (``2^-11``); bf16 / fp16 inputs are exact in fp32 arithmetic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .. import reference as ref
from ..ops.attention import dequant_kv, p_dtype_of
from ..ops.indexer import score_dtype_of

__all__ = ["Check", "gemm", "topk", "index_scores", "candidate_blocks", "pooling", "attention", "route", "exact",
           "combine", "hash_rows", "lookup"]

U_OUT = {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}  # one ulp
# absolute rounding step of the output dtype's subnormals (where u_out * |ref| no longer bounds rounding)
ABS_OUT = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}
U_TF32 = 2.0**-11
U_ACC = 2.0**-22
TINY = 1e-30


@dataclass
class Check:
    passed: bool
    max_abs: float
    max_rel: float
    budget: float  # worst |err| / tolerance (1.0 = at the limit)
    tolerance: str
    message: str = ""


def _compare(out: torch.Tensor, want: torch.Tensor, tol: torch.Tensor, desc: str, name: str) -> Check:
    got = out.double()
    if got.numel() == 0:
        return Check(True, 0.0, 0.0, 0.0, desc)
    inf = torch.isinf(want)
    same_inf = inf & (got == want)
    err = torch.where(same_inf, torch.zeros_like(got), (got - want).abs())
    err = torch.where(inf & ~same_inf, torch.full_like(got, math.inf), err)
    err = torch.where(torch.isnan(got), torch.full_like(got, math.nan), err)
    ok = (err <= tol) | (torch.isnan(got) & torch.isnan(want))   # NaN where the reference has NaN is right
    finite_err = torch.nan_to_num(err, nan=math.inf)
    max_abs = float(finite_err.max())
    scale = float(want[~inf].abs().max()) if bool((~inf).any()) else 1.0
    ratio = torch.nan_to_num(finite_err / (tol + TINY), nan=math.inf)
    check = Check(bool(ok.all()), max_abs, max_abs / max(scale, TINY), float(ratio.max()), desc)
    if not check.passed:
        pos = tuple(int(i) for i in (~ok).nonzero()[0])
        check.message = (f"{name}{list(pos)} = {float(got[pos]):.6g}, reference {float(want[pos]):.6g}, "
                         f"tolerance {float(tol[pos]):.3g}; {int((~ok).sum())} of {ok.numel()} elements off")
    return check


def _worst(*checks: Check) -> Check:
    failed = [c for c in checks if not c.passed]
    pick = failed[0] if failed else max(checks, key=lambda c: c.budget)
    return Check(not failed, max(c.max_abs for c in checks), max(c.max_rel for c in checks),
                 max(c.budget for c in checks), "; ".join(c.tolerance for c in checks), pick.message)


def _abs_fp4(w: torch.Tensor) -> torch.Tensor:
    return (w.view(torch.uint8) & 0x77).view(w.dtype) if w.dtype != torch.float4_e2m1fn_x2 else \
        (w.view(torch.uint8) & 0x77).view(torch.float4_e2m1fn_x2)


def _abs_e4m3(w: torch.Tensor) -> torch.Tensor:
    return (w.view(torch.uint8) & 0x7F).view(torch.float8_e4m3fn)


def _finite_abs(t: torch.Tensor) -> torch.Tensor:
    """|t| with NaN and +-inf (E4M3: the NaN codes) as 0, for a rounding bound over the finite terms only.
    A non-finite input makes the products it enters exact (+-inf, NaN, or relu's exact 0), so the error of
    a result stays that of its finite terms."""
    if t.dtype == torch.float8_e4m3fn:
        b = t.view(torch.uint8) & 0x7F
        return b.masked_fill(b == 0x7F, 0).view(torch.float8_e4m3fn)
    return t.abs().nan_to_num(0.0, 0.0, 0.0)


def _at(t: torch.Tensor, idx: torch.Tensor, fill: float) -> torch.Tensor:
    """``t[b, s, idx[b, s, j]]`` where ``idx >= 0``, ``fill`` where it is -1 (also when ``t`` has no keys)."""
    if t.shape[2] == 0:
        return torch.full(idx.shape, fill, dtype=t.dtype)
    return torch.where(idx >= 0, t.gather(2, idx.clamp(min=0)), torch.full_like(t[..., :1], fill))


def gemm(op: str, args: Mapping[str, Any], outs: tuple, refs: tuple) -> Check:
    """|y - ref| <= u_out |ref| + (2 u_in + u_w + 2^-22 sqrt(K)) * sum_k |q(x)| |w| (fp32 accumulation)."""
    x = args["x"]
    k = x.shape[1]
    absargs = dict(args, x=x.abs())
    absargs["w"] = _abs_e4m3(args["w"]) if op == "fp8_gemm" else _abs_fp4(args["w"])
    bound = getattr(ref, op)(**absargs)
    u_in = U_TF32 if (x.dtype == torch.float32 and args["act_quant"] is None) else 0.0
    u_w = 2.0**-8 if args["w_scale"].dtype == torch.float32 else 0.0
    u_out = U_OUT[x.dtype]
    coef = 2 * u_in + u_w + U_ACC * math.sqrt(k)
    tol = u_out * refs[0].abs() + coef * bound + ABS_OUT[x.dtype]
    return _compare(outs[0], refs[0], tol, f"{u_out:.2g}|ref| + {coef:.2g}*sum|x||w|", "y")


def topk(op: str, args: Mapping[str, Any], outs: tuple, refs: tuple) -> Check:
    """Checked on reference scores of the returned set: right count, distinct, selectable (visible and a
    candidate), in ascending order before the -1s when ``sorted_output``, and every chosen key's reference
    score within tolerance of the true k-th best (when that is -inf: every key scoring above -inf chosen);
    scores (if returned) vs reference."""
    q, k, w = args["q"], args["k"], args["weights"]
    sd = score_dtype_of(args)
    cand = args.get("candidates")
    scores = ref.indexer_scores(q, k, w, args["visible"], args["k_scale"], sd, cand)
    u, tol_all = _score_bound(args, sd)
    idx = outs[0].long()
    b_n, s_n, top = idx.shape
    vis = args["visible"].clamp(0, k.shape[1])
    ok = ref.selectable(args["visible"], k.shape[1], cand)
    in_order = bool(args.get("sorted_output", False))
    budget = 0.0
    for b in range(b_n):
        for s in range(s_n):
            n_ok = int(ok[b, s].sum())
            row, count = idx[b, s], min(top, n_ok)
            valid = row[row != -1]
            where = f"row (b={b}, s={s})"
            if valid.numel() != count or int((row == -1).sum()) != top - count:
                return Check(False, math.inf, math.inf, math.inf, "set check",
                             f"{where}: {valid.numel()} indices and {int((row == -1).sum())} x -1, expected "
                             f"{count} indices (visible {int(vis[b, s])}, selectable {n_ok}, topk {top})")
            if in_order and not (bool((row[:count] != -1).all()) and bool((valid[1:] > valid[:-1]).all())):
                return Check(False, math.inf, math.inf, math.inf, "set check",
                             f"{where}: sorted_output, but {row.tolist()} is not ascending keys then -1")
            if count == 0:
                continue
            if bool(((valid < 0) | (valid >= k.shape[1])).any()) or valid.unique().numel() != count or \
                    not bool(ok[b, s, valid.clamp(0, max(k.shape[1] - 1, 0))].all()):
                return Check(False, math.inf, math.inf, math.inf, "set check",
                             f"{where}: indices {valid.tolist()} are not {count} distinct selectable keys (visible "
                             f"< {int(vis[b, s])}{' and candidates' if cand is not None else ''})")
            kth = scores[b, s].sort(descending=True).values[count - 1]
            chosen = scores[b, s, valid]
            if kth == -math.inf and int((chosen > -math.inf).sum()) < int((scores[b, s] > -math.inf).sum()):
                return Check(False, math.inf, math.inf, math.inf, "set check",
                             f"{where}: fewer than all {int((scores[b, s] > -math.inf).sum())} keys above -inf "
                             f"are among the {count} chosen (visible {int(vis[b, s])}, topk {top}); a key scoring "
                             "-inf or NaN took a slot of one scoring a number")
            slack = tol_all[b, s, valid] + float(tol_all[b, s].max())
            short = (kth - chosen) / slack
            budget = max(budget, float(short.max()))
            if bool((chosen < kth - slack).any()):
                j = int((chosen - (kth - slack)).argmin())
                return Check(False, float(kth - chosen[j]), math.inf, budget, "set check",
                             f"{where}: key {int(valid[j])} scores {float(chosen[j]):.6g} but the {count}-th best "
                             f"is {float(kth):.6g} (tolerance {float(slack[j]):.3g})")
    set_check = Check(True, 0.0, 0.0, budget, f"set within {u:.2g}*sum|w||q||k| of the k-th best")
    if len(outs) < 2:
        return set_check
    want = _at(scores, idx, -math.inf)
    tol = _at(tol_all, idx, 0.0) + u * want.abs().nan_to_num(0, 0, 0)
    return _worst(set_check, _compare(outs[1], want, tol, f"scores {u:.2g}*bound", "scores"))


def _score_bound(args: Mapping[str, Any], sd: torch.dtype) -> tuple[float, torch.Tensor]:
    """(u, u * sum_h |w| relu(|q| . |key|) + TINY): the indexer score's error bound over every key (MXFP4 keys:
    the sign bits cleared)."""
    q, k, w = args["q"], args["k"], args["weights"]
    k_abs = _abs_fp4(k) if k.dtype == torch.uint8 else _finite_abs(k)
    bound = ref.indexer_scores(_finite_abs(q), k_abs, _finite_abs(w),
                               torch.full_like(args["visible"], k.shape[1]), args["k_scale"], torch.float32)
    # a 16-bit score: an fp32 value next to a rounding boundary may round one ulp (2^-7 / 2^-10 relative)
    # the other way at each of the three rounding points (q.k, w*relu, the head sum): 3 ulps of the bound
    u = {torch.bfloat16: 3 * 2.0**-7, torch.float16: 3 * 2.0**-10}.get(
        sd, U_TF32 if q.dtype == torch.float32 else 2.0**-18)
    return u, u * bound + TINY


def index_scores(op: str, args: Mapping[str, Any], outs: tuple, refs: tuple) -> Check:
    """indexer_scores: -inf exactly where the reference is -inf (invisible, NaN), elsewhere within
    ``u * (sum_h |w| relu(|q| . |key|) + |ref|)`` (u: 3 ulps of a 16-bit score_dtype, else the fp32 / TF32
    accumulation allowance)."""
    u, tol = _score_bound(args, score_dtype_of(args))
    want = refs[0]
    return _compare(outs[0], want, tol + u * want.abs().nan_to_num(0, 0, 0), f"{u:.2g}*(bound + |ref|)", "scores")


def candidate_blocks(op: str, args: Mapping[str, Any], outs: tuple, refs: tuple) -> Check:
    """select_candidate_blocks, exactly on the set (block maxima involve no rounding; ties either way): the
    mask is whole blocks, as many as the reference keeps, every kept block scores above -inf and at least
    the reference's smallest kept block score."""
    mask, n = outs[0].cpu(), args["scores"].shape[2]
    bs, want_n = args["block_size"], args["n_blocks"]
    bscore = ref.candidate_block_scores(args["scores"], args["compress_len"], bs)     # [B, S, nb]
    nb = bscore.shape[2]
    if nb == 0 or mask.numel() == 0:
        return Check(True, 0.0, 0.0, 0.0, "exact set (no positions)")
    bs = min(bs, n)                       # a block longer than N is one block of the N positions
    pad = torch.zeros(mask.shape[:2] + (nb * bs,), dtype=torch.bool)
    pad[..., :n] = mask
    blocks = pad.view(*mask.shape[:2], nb, bs)
    kept = blocks[..., 0]
    uniform = blocks == kept[..., None]
    uniform[..., -1, :] |= torch.arange(bs) >= n - (nb - 1) * bs      # the padding of the last block
    if not bool(uniform.all()):
        pos = tuple(int(i) for i in (~uniform).nonzero()[0])
        return Check(False, math.inf, math.inf, math.inf, "set check",
                     f"mask of (b={pos[0]}, s={pos[1]}) block {pos[2]} is not all True or all False")
    for b in range(mask.shape[0]):
        for s in range(mask.shape[1]):
            live = bscore[b, s] > -math.inf
            count = min(want_n, int(live.sum()))
            chosen = bscore[b, s, kept[b, s]]
            kth = bscore[b, s].sort(descending=True).values[count - 1] if count else math.inf
            if int(kept[b, s].sum()) != count or bool((chosen == -math.inf).any()) or bool((chosen < kth).any()):
                return Check(False, math.inf, math.inf, math.inf, "set check",
                             f"(b={b}, s={s}): kept blocks {kept[b, s].nonzero().flatten().tolist()} are not "
                             f"{count} of the best-scoring blocks above -inf (the {count}-th best scores "
                             f"{float(kth):.6g}; compress_len {int(args['compress_len'][b, s])})")
    return Check(True, 0.0, 0.0, 0.0, "exact set (ties either way)")


def pooling(op: str, args: Mapping[str, Any], outs: tuple, refs: tuple) -> Check:
    """|out - ref| <= 2^-14 * sum_i p_i |v_i| (the same pooling applied to |kv|)."""
    absargs = dict(args, kv=args["kv"].abs())
    if args["prev_kv"] is not None:
        absargs["prev_kv"] = args["prev_kv"].abs()
    bound = ref.kv_compress(**absargs)
    tol = 2.0**-14 * bound + TINY
    return _compare(outs[0], refs[0], tol, "2^-14*sum p|v|", "out")


def attention(op: str, args: Mapping[str, Any], outs: tuple, refs: tuple) -> Check:
    """o: u_out|ref| + (2 u_p + 2 u_dot L) * max|v| per row, where u_p covers P rounded to the input
    dtype for the P.V product, u_dot the q.k products (TF32 for fp32), L = scale * max_j sum|q||k_j|."""
    q, kv, idx = args["q"].double(), dequant_kv(args).double(), args["idx"].long()   # V4.1: decoded rows
    valid = (idx >= 0).unsqueeze(-1)
    gathered = kv.gather(1, idx.clamp(min=0).flatten(1).unsqueeze(-1).expand(-1, -1, kv.shape[-1]))
    gathered = gathered.view(*idx.shape, kv.shape[-1]) * valid  # [B,S,K,D]
    vmax = gathered.abs().amax(dim=(2, 3), keepdim=False) if idx.shape[2] else torch.zeros(idx.shape[:2], dtype=torch.float64)
    logit_abs = args["scale"] * torch.einsum("bshd,bskd->bshk", q.abs(), gathered.abs())
    logit_abs = logit_abs.amax(dim=-1) if idx.shape[2] else torch.zeros(q.shape[:3], dtype=torch.float64)
    dtype = args["q"].dtype
    # P rounded for the P.V product (an online kernel rounds against its running max: one rounding
    # either side of the reference's), or fp32 P (TF32 products for fp32 inputs)
    p_dt = p_dtype_of(args)
    u_p = U_TF32 if p_dt == torch.float32 else (2.0**-8 if p_dt == torch.bfloat16 else 2.0**-11)
    u_dot = U_TF32 if dtype == torch.float32 else 2.0**-18
    u_out = U_OUT[dtype]
    rel = 2 * u_p + 2 * u_dot * logit_abs  # [B,S,H]
    tol = u_out * refs[0].abs() + (rel * vmax.unsqueeze(-1)).unsqueeze(-1) + ABS_OUT[dtype]
    check = _compare(outs[0], refs[0], tol, f"{u_out:.2g}|ref| + ({2 * u_p:.2g} + {2 * u_dot:.2g}L)*max|v|", "o")
    if len(outs) < 2:
        return check
    lse_tol = 2.0**-16 + 2 * u_dot * logit_abs
    return _worst(check, _compare(outs[1], refs[1], lse_tol, "lse 2^-16 + 2u_dot*L", "lse"))


def route(op: str, args: Mapping[str, Any], outs: tuple, refs: tuple) -> Check:
    """ids: hash ids exactly, or a valid top-k set by reference scores; weights vs the reference weights
    of the returned ids (2^-18 relative)."""
    ids, weights = outs[0].long(), outs[1]
    t_n, top = ids.shape
    e = args["logits"].shape[1]
    if args["hash_ids"] is not None:
        if not torch.equal(ids, args["hash_ids"].long()):
            return Check(False, math.inf, math.inf, math.inf, "hash ids exact", "ids differ from hash_ids")
    else:
        scores = ref.moe_scores(args["logits"], args["bias"], args.get("bias_alt"), args.get("use_alt"))
        slack_all = 2.0**-18 * (scores.abs() + 1)
        for t in range(t_n):
            row = ids[t]
            if bool(((row < 0) | (row >= e)).any()) or row.unique().numel() != top:
                return Check(False, math.inf, math.inf, math.inf, "set check",
                             f"token {t}: ids {row.tolist()} are not {top} distinct experts in [0, {e})")
            kth = scores[t].sort(descending=True).values[top - 1]
            if bool((scores[t, row] < kth - slack_all[t, row] - slack_all[t].max()).any()):
                return Check(False, math.inf, math.inf, math.inf, "set check",
                             f"token {t}: ids {row.tolist()} are not the top-{top} by s + bias")
    want = ref.moe_route_weights(args["logits"], ids.to(torch.int32), args["route_scale"],
                                 args.get("weight_eps", 0.0))
    tol = 2.0**-18 * want.abs() + 1e-7
    return _compare(weights, want, tol, "weights 2^-18|ref| + 1e-7", "weights")


def exact(op: str, args: Mapping[str, Any], outs: tuple, refs: tuple) -> Check:
    """Every output equal to the reference exactly (data movement and integer outputs)."""
    checks = []
    for i, (o, r) in enumerate(zip(outs, refs)):
        checks.append(_compare(o, r.double(), torch.zeros_like(r, dtype=torch.float64), "exact", f"output{i}"))
    return _worst(*checks)


def combine(op: str, args: Mapping[str, Any], outs: tuple, refs: tuple) -> Check:
    """|y - ref| <= u_out |ref| + 2^-20 * sum_j |w| |y_sorted| (fp32 sum)."""
    w = args["weights"].abs() if args["weights"] is not None else None
    bound = ref.moe_combine(args["y_sorted"].abs(), args["src"], w, args["topk"])
    u_out = U_OUT[args["y_sorted"].dtype]
    tol = u_out * refs[0].abs() + 2.0**-20 * bound + ABS_OUT[args["y_sorted"].dtype]
    return _compare(outs[0], refs[0], tol, f"{u_out:.2g}|ref| + 2^-20*sum|w||y|", "y")


def hash_rows(op: str, args: Mapping[str, Any], outs: tuple, refs: tuple) -> Check:
    """Integer row ids equal to the reference's, compared as int64 (no float64 rounding above 2^53)."""
    got, want = outs[0], refs[0]
    if got.dtype == want.dtype and torch.equal(got, want):
        return Check(True, 0.0, 0.0, 0.0, "exact int64")
    bad = (got.long() != want).nonzero()
    where = ""
    if len(bad):
        pos = tuple(bad[0].tolist())
        where = f" at {list(pos)}: {int(got[pos])}, reference {int(want[pos])}"
    return Check(False, math.inf, math.inf, math.inf, "exact int64",
                 f"rows ({got.dtype}) differ from the reference in {len(bad)} of {want.numel()} entries{where}")


def lookup(op: str, args: Mapping[str, Any], outs: tuple, refs: tuple) -> Check:
    """The exact dequantised rows rounded once to ``out_dtype`` (E4M3 x 2^k is exact in float32, so every
    variant rounds the same value): equal element for element, NaN where the reference has NaN."""
    want = refs[0].to(args["out_dtype"]).double()
    return _compare(outs[0], want, torch.zeros_like(want), f"exact after rounding to {args['out_dtype']}", "out")
