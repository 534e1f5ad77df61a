"""``dsv4rt run --check``: does this backend, in this layout, compute the model right?

Everything is teacher-forced on the token ids of the run (prompt + generated), so no free-running
divergence enters, and compared position by position (every prompt position from the prefill, then every
decode step). The verdict has two parts; both must pass (docs/verification.md says what they prove):

* **ops** - fp32 activations with the release's quantisation (FP8 activations on the GEMMs, the FP8 / FP4
  simulations, the bf16 precision points at their fp32 value): every registry op call of the run is
  replayed on the float64 reference with the same inputs and judged with the op's conformance tolerance
  (:class:`dsv4rt.model.opcheck.AuditCaller`).
* **network** - fp32 activations, quantisation off: the logits of every position against a second,
  independent forward pass whose ops are the float64 reference (:class:`ReferenceCaller`), in one
  process, within :func:`network_rtol`. Without quantisation the network is smooth, so the bound can be
  tight; with it, a last-bit difference upstream can move one E4M3 rounding (measured on the tiny preset: a
  7.7e-8 relative input difference moved one position's logits by 4.8e-3), which says nothing about
  correctness: that figure is measured and printed, not judged.

At bf16 nothing is judged: the run prints its agreement with the reference (top-1 %, max |diff|) next to
the spread between two CPU variants on the same tokens, the scale against which to read it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TextIO

import torch

from .opcall import OpCaller
from .opcheck import AuditCaller, OpAudit, ReferenceCaller
from .transformer import Transformer

__all__ = ["Agreement", "agreement", "forced_logits", "network_rtol", "check_run", "SPREAD_PAIR"]

U_FP32 = 2.0**-24          # fp32 unit round-off
OPS_PER_LAYER = 12         # registry ops on one position's path through a block (GEMMs, compressors, attention, MoE)
SAFETY = 16.0
SPREAD_PAIR = ("cpu/numpy", "cpu/torch")   # two CPU variants whose bf16 spread is the scale for the bf16 figures


def network_rtol(cfg: Any) -> float:
    """Per-position bound on ``max |logits - reference| / max |reference|`` at fp32, quantisation off.

    Built from the fp32 term of the ops' conformance tolerances: a length-K fp32 reduction carries a
    rounding error of about ``u sqrt(K)`` relative to ``sum |x||w|`` (``u = 2^-24``; the conformance
    bound ``2^-22 sqrt(K)`` is its worst case), and one position's logits go through
    ``D = OPS_PER_LAYER * layers + 1`` such ops whose independent roundings add in quadrature:
    ``tol = SAFETY * sqrt(D) * u * sqrt(K_max)``, ``K_max`` the model's longest reduction. ``SAFETY`` (16)
    covers ``sum|x||w| / |y|`` and the tail. docs/verification.md lists the measured agreement (~100x
    below) and what a wrong kernel or layout gives (~1000x above).
    """
    k_max = max(cfg.dim, cfg.n_heads * cfg.head_dim // max(cfg.o_groups, 1), cfg.moe_inter_dim,
                cfg.o_groups * cfg.o_lora_rank, cfg.q_lora_rank)
    depth = OPS_PER_LAYER * cfg.n_layers + 1
    return SAFETY * math.sqrt(depth) * U_FP32 * math.sqrt(k_max)


@dataclass
class Agreement:
    """Two runs' logits over the same positions."""

    positions: int
    top1: int               # positions whose argmax agrees
    max_abs: float          # max |a - b| over every position and vocabulary entry
    max_rel: float          # max over positions of max |a - b| / max |b|
    worst: int              # the position (0-based, sequences concatenated) of max_rel
    rels: list[float]

    def over(self, tol: float) -> int:
        return sum(1 for r in self.rels if not r <= tol)

    def top1_text(self) -> str:
        return f"top-1 {self.top1}/{self.positions} ({100.0 * self.top1 / max(self.positions, 1):.1f}%)"


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> Agreement:
    """Compare per-sequence logits ``[positions, V]`` of run ``a`` with those of ``b`` (the reference side)."""
    x, y = torch.cat([t.float() for t in a]), torch.cat([t.float() for t in b])
    diff = (x - y).abs().nan_to_num(nan=math.inf)
    scale = y.abs().amax(dim=-1).clamp_min(1e-30)
    rel = diff.amax(dim=-1) / scale
    worst = int(rel.argmax()) if rel.numel() else 0
    return Agreement(int(x.shape[0]), int((x.argmax(-1) == y.argmax(-1)).sum()), float(diff.max()) if diff.numel()
                     else 0.0, float(rel.max()) if rel.numel() else 0.0, worst, rel.tolist())


@torch.inference_mode()
def forced_logits(model: Transformer, seqs: list[list[int]], n_prompt: list[int],
                  prefill_chunk: int | None = None) -> list[torch.Tensor]:
    """fp32 logits of every position of every sequence, on the CPU: the common prompt prefix prefilled (in
    chunks, all positions kept), then one-token decode steps over the rest, as ``generate`` runs them
    (sequences in lockstep; a sequence that has ended is padded with its last token and its logits dropped)."""
    b, first = len(seqs), min(n_prompt)
    total = max(len(s) for s in seqs)
    padded = torch.tensor([s + [s[-1]] * (total - len(s)) for s in seqs], dtype=torch.long)
    cache = model.new_cache(b, max_seq_len=max(total, model.cfg.window_size))
    parts: list[torch.Tensor] = []
    step = prefill_chunk or first
    for c0 in range(0, first, step):
        parts.append(model.forward(padded[:, c0:min(c0 + step, first)], cache, all_logits=True).float().cpu())
    for pos in range(first, total):
        parts.append(model.forward(padded[:, pos:pos + 1], cache, all_logits=True).float().cpu())
    logits = torch.cat(parts, dim=1)
    return [logits[i, :len(s)] for i, s in enumerate(seqs)]


@contextlib.contextmanager
def _ops(model: Transformer, caller: OpCaller) -> Iterator[OpCaller]:
    saved, model.ops = model.ops, caller
    try:
        yield caller
    finally:
        model.ops = saved


def _gather_audits(model: Transformer, audit: dict[str, OpAudit]) -> dict[str, OpAudit]:
    """The audits of every rank merged per op (one process: this one's): calls and failures summed, the
    worst budget, the first failure with its rank."""
    if model.par is None:
        return audit
    import torch.distributed as dist

    ranks: list[Any] = [None] * model.par.world
    dist.all_gather_object(ranks, audit)
    merged: dict[str, OpAudit] = {}
    for rank, per_op in enumerate(ranks):
        for name, a in per_op.items():
            m = merged.setdefault(name, OpAudit())
            m.calls, m.failed = m.calls + a.calls, m.failed + a.failed
            m.impls |= a.impls
            if a.budget >= m.budget:
                m.budget, m.tolerance = a.budget, a.tolerance
            if a.first_failure and not m.first_failure:
                m.first_failure = f"rank {rank}, {a.first_failure}"
    return merged


def _print_audits(audit: dict[str, OpAudit], out: TextIO) -> bool:
    for name, a in audit.items():
        state = "PASS" if a.passed else f"FAIL ({a.failed} of {a.calls} calls)"
        print(f"           {name:<17} {', '.join(sorted(a.impls)):<24} {a.calls:>5} calls, worst "
              f"{100 * a.budget:6.2f}% of tolerance  {state}", file=out)
        if a.first_failure:
            print(f"             first failure: {a.first_failure}", file=out)
    return all(a.passed for a in audit.values())


def check_run(model: Transformer, seqs: list[list[int]], n_prompt: list[int], dtype: str, precision: str,
              prefill_chunk: int | None, tested: Callable[[], Any],
              build: Callable[[str, bool], Transformer], out: TextIO) -> bool:
    """Run the check (see the module docstring) and print it; True when the verdict is PASS.

    ``model`` is the run's model in its layout (``model.par`` under torchrun; every rank calls this);
    ``tested()`` is the context that selects the backend under test; ``build(dtype, one_process)`` builds
    the same weights at activation dtype "fp32" / "bf16", in this layout or (``one_process``) as a single
    process on the CPU; it returns ``model`` itself where that is the same thing."""
    rank0 = model.par is None or model.par.rank == 0
    forced = dict(seqs=seqs, n_prompt=n_prompt, prefill_chunk=prefill_chunk)
    m32 = build("fp32", False)
    with tested():
        with _ops(m32, OpCaller(False, precision)):
            t_net = forced_logits(m32, **forced)
        with _ops(m32, AuditCaller(True, precision)) as audit:
            t_quant = forced_logits(m32, **forced)
        t_bf16 = forced_logits(model, **forced) if dtype == "bf16" else None
    audited = _gather_audits(model, audit.result())
    if not rank0:
        return True
    one32 = build("fp32", True)
    with _ops(one32, ReferenceCaller(False, precision)):
        net = agreement(t_net, forced_logits(one32, **forced))
    with _ops(one32, ReferenceCaller(True, precision)):
        quant = agreement(t_quant, forced_logits(one32, **forced))
    tol = network_rtol(model.cfg)
    n_pos = net.positions
    where = (f"{model.par.world} processes (tp {model.par.tp}, ep {model.par.ep})" if model.par is not None
             else "this process")
    print(f"check    teacher-forced on the run's tokens ({len(seqs)} x {', '.join(str(len(s)) for s in seqs)}: prompt "
          f"+ generated), all {n_pos} positions; the other side is the float64 reference ops in one process", file=out)
    print(f"  ops    fp32 activations, release quantisation, {where}: every op call against the reference on the "
          f"same inputs, within the op's conformance tolerance", file=out)
    ops_ok = _print_audits(audited, out)
    net_ok = net.over(tol) == 0
    print(f"  network fp32, quantisation off: max |logit diff| / max |logit| {net.max_rel:.3g} (position {net.worst}) "
          f"{'<=' if net_ok else '>'} {tol:.3g} = network tolerance at every position; {net.over(tol)} of {n_pos} "
          f"over; {net.top1_text()}  {'PASS' if net_ok else 'FAIL'}", file=out)
    ok = ops_ok and net_ok
    print(f"verdict  {'PASS' if ok else 'FAIL'}: ops {'pass' if ops_ok else 'FAIL'}, network {'pass' if net_ok else 'FAIL'}"
          f" (docs/verification.md: what this proves and what it does not)", file=out)
    print(f"measured (not judged) fp32 with release quantisation vs the reference: max relative diff "
          f"{quant.max_rel:.3g} (position {quant.worst}), {quant.over(tol)} of {n_pos} positions over the network "
          f"tolerance (E4M3 rounding flips move whole positions), {quant.top1_text()}", file=out)
    if t_bf16 is not None:
        _print_bf16(t_bf16, build("bf16", True), forced, precision, out)
    return ok


def _print_bf16(t_bf16: list[torch.Tensor], one: Transformer, forced: dict, precision: str, out: TextIO) -> None:
    from ..select import use_backend

    with _ops(one, ReferenceCaller(True, precision)):
        ref = forced_logits(one, **forced)
    run = agreement(t_bf16, ref)
    spread = []
    for variant in SPREAD_PAIR:
        with _ops(one, OpCaller(True, precision)), use_backend(variant):
            spread.append(forced_logits(one, **forced))
    pair = agreement(spread[0], spread[1])
    print(f"measured (not judged) bf16 (the run's dtype) vs the reference: {run.top1_text()}, max |logit diff| "
          f"{run.max_abs:.4g}; for scale, {SPREAD_PAIR[0]} vs {SPREAD_PAIR[1]} on the same tokens: "
          f"{pair.top1_text()}, max |logit diff| {pair.max_abs:.4g}", file=out)
