"""The MoE layer (spec 5): sqrtsoftplus router (bias for selection in score-routed layers, ``tid2eid`` in
hash-routed ones) through ``moe_route``, FP4 experts through ``moe_dispatch`` -> ``fp4_grouped_gemm`` ->
clamped SwiGLU with the routing weight applied before the down projection -> ``fp4_grouped_gemm`` ->
``moe_combine``, plus the FP8 shared expert (clamped too: spec 10.1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..invariant import linear, pointwise
from .config import ModelConfig
from .opcall import OpCaller
from .weights import Fp8Linear, Loader

__all__ = ["MoE", "swiglu"]


def swiglu(g: Tensor, u: Tensor, limit: float) -> Tensor:
    """``silu(min(g, limit)) * clamp(u, -limit, limit)`` in float32 (no clamp when limit <= 0)."""
    g, u = g.float(), u.float()
    if limit > 0:
        u = torch.clamp(u, -limit, limit)
        g = torch.clamp(g, max=limit)
    return pointwise(F.silu, g) * u


class MoE:
    """``<prefix>.{gate.weight, gate.bias | gate.tid2eid, experts.E.w{1,2,3}, shared_experts.w{1,2,3}}``.

    With an expert-parallel layout (``ld.par.ep > 1``) only this rank's experts are loaded and the forward
    goes through ``par.moe`` (all-to-all dispatch / combine, :mod:`dsv4rt.distributed.moe`)."""

    def __init__(self, cfg: ModelConfig, layer: int, ld: Loader, prefix: str) -> None:
        self.n_experts, self.topk = cfg.experts_of(layer)
        self.route_scale = cfg.route_scale
        self.limit = cfg.swiglu_limit
        self.par = ld.par if ld.par is not None and ld.par.ep > 1 else None
        first, n = self.par.ep_experts(self.n_experts) if self.par is not None else (0, self.n_experts)
        self.gate = ld.f32(f"{prefix}.gate.weight")
        self.hash = cfg.is_hash(layer)
        self.tid2eid = ld.raw(f"{prefix}.gate.tid2eid").to(torch.int32) if self.hash else None
        self.bias = None if self.hash else ld.f32(f"{prefix}.gate.bias")
        # V4.1: image-span tokens select with gate.bias_vl (loaded; text never uses it), weights / (sum + 1e-20)
        self.v41 = cfg.is_v41
        self.bias_vl = ld.f32(f"{prefix}.gate.bias_vl") if self.v41 else None
        self.experts = ld.experts(f"{prefix}.experts", n, cfg.moe_inter_dim, cfg.expert_dtype, first)
        self.shared: Fp8Linear | None = None
        self.shared_down: Fp8Linear | None = None
        if cfg.n_shared_experts:
            self.shared = ld.fp8(f"{prefix}.shared_experts.w1", f"{prefix}.shared_experts.w3")
            self.shared_down = ld.fp8(f"{prefix}.shared_experts.w2")

    def route(self, ops: OpCaller, x: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(ids [T, topk] int32, weights [T, topk] float32) of tokens x [T, dim]."""
        logits = linear(x.float(), self.gate)
        if self.v41:
            return ops.moe_route_v41(logits, self.bias, self.topk, self.route_scale, self.bias_vl, None)
        hash_ids = self.tid2eid[token_ids] if self.hash else None
        return ops.moe_route(logits, self.bias, self.topk, self.route_scale, hash_ids)

    def expert_rows(self, ops: OpCaller, xs: Tensor, offsets: Tensor, w_rows: Tensor) -> Tensor:
        """Expert outputs of token copies grouped by (loaded) expert: SwiGLU scaled by each row's routing
        weight ``w_rows`` [R] before the down projection."""
        g, u = self.experts.gate_up(ops, xs, offsets)
        h = swiglu(g, u, self.limit) * w_rows.unsqueeze(-1)
        return self.experts.down(ops, h.to(xs.dtype), offsets)

    def add_shared(self, ops: OpCaller, x: Tensor, y: Tensor) -> Tensor:
        """``y`` (fp32 routed output) plus the shared expert of ``x``, in x's dtype."""
        if self.shared is not None:
            g, u = self.shared(ops, x)
            y = y + self.shared_down(ops, swiglu(g, u, self.limit).to(x.dtype)).float()
        return y.to(x.dtype)

    def __call__(self, ops: OpCaller, x: Tensor, token_ids: Tensor) -> Tensor:
        """x [T, dim] (after ffn_norm), token_ids [T] -> [T, dim]."""
        if self.par is not None:
            return self.par.moe(self, ops, x, token_ids)
        ids, weights = self.route(ops, x, token_ids)
        xs, offsets, src = ops.moe_dispatch(x, ids, self.n_experts)
        # the routed sum stays fp32 until the shared expert is added (one rounding, as the release's fp32 ``y``)
        rows = self.expert_rows(ops, xs, offsets, weights.reshape(-1)[src.long()])
        y = ops.moe_combine(rows.float(), src, self.topk)
        return self.add_shared(ops, x, y)
