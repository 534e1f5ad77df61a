"""dsv4rt_example: a minimal third-party dsv4rt backend (the template for backend authors).

The entry point ``example = "dsv4rt_example:backend"`` in group ``dsv4rt.backends`` makes dsv4rt find it.
dsv4rt calls :func:`backend` (a zero-argument factory), asks :meth:`ExampleBackend.probe` whether it can run
(cheap: no device work, no heavy import) and calls :meth:`ExampleBackend.load` once, on first use, to
register the implementations. Each implementation takes the op's parameters positionally, in the order of
the op's signature (see ``dsv4rt.ops.<name>.__doc__`` for the contract), and allocates its outputs with
:func:`dsv4rt.backend.new_output` so that conformance can poison them.
"""
from __future__ import annotations

import importlib.util

from dsv4rt.backend import Backend, Probe, Registrar, new_output

__all__ = ["ExampleBackend", "backend"]

PRIORITY = 1  # below the built-in cpu backend: this plug-in runs only when chosen explicitly


def moe_route(logits, bias, topk, route_scale, score_func="sqrtsoftplus", hash_ids=None, bias_alt=None,
              use_alt=None, weight_eps=0.0):
    """ids = topk(sqrt(softplus(logits)) + bias) (or hash_ids; bias_alt for the tokens use_alt marks);
    weights = s[ids] / (sum(s[ids]) + weight_eps) * route_scale."""
    import torch

    # float64 so that a row of very negative logits does not underflow to 0/0
    s = torch.nn.functional.softplus(logits.double()).sqrt()
    if hash_ids is not None:
        ids = hash_ids.long()
    else:
        b = 0.0 if bias is None else bias.double()[None, :]
        if bias_alt is not None:
            b = torch.where(use_alt[:, None], bias_alt.double()[None, :], b)
        ids = (s + b).topk(topk, dim=1).indices
    chosen = s.gather(1, ids)
    w = chosen / (chosen.sum(dim=1, keepdim=True) + weight_eps) * route_scale
    ids_out = new_output(ids.shape, torch.int32, logits.device)
    w_out = new_output(ids.shape, torch.float32, logits.device)
    ids_out.copy_(ids)
    w_out.copy_(w)
    return ids_out, w_out


def moe_dispatch(x, ids, num_experts):
    """Token copies grouped by expert, stable in (t, j) order; src[r] = t*topk + j; offsets = prefix counts."""
    import torch

    t, h = x.shape
    topk = ids.shape[1]
    flat = ids.reshape(-1).long()
    order = torch.sort(flat, stable=True).indices  # pair ids p = t*topk + j, grouped by expert
    counts = torch.bincount(flat, minlength=num_experts)
    x_sorted = new_output((t * topk, h), x.dtype, x.device)
    offsets = new_output((num_experts + 1,), torch.int32, x.device)
    src = new_output((t * topk,), torch.int32, x.device)
    if order.numel():
        x_sorted.copy_(x[order // topk])
    src.copy_(order)
    offsets[0] = 0
    offsets[1:].copy_(torch.cumsum(counts, 0))
    return x_sorted, offsets, src


def moe_combine(y_sorted, src, weights, topk=None):
    """y[t] = sum_j weights[t, j] * y_sorted[r] with src[r] = t*topk + j, accumulated in fp32."""
    import torch

    k = weights.shape[1] if weights is not None else topk
    r, h = y_sorted.shape
    p = src.long()
    tok = p // k
    rows = y_sorted.float()
    if weights is not None:
        rows = rows * weights.float()[tok, p % k][:, None]
    acc = torch.zeros((r // k, h), dtype=torch.float32, device=y_sorted.device)
    acc.index_add_(0, tok, rows)
    out = new_output((r // k, h), y_sorted.dtype, y_sorted.device)
    out.copy_(acc)
    return out


OPS = ("moe_route", "moe_dispatch", "moe_combine")


class ExampleBackend(Backend):
    name = "example"
    device_type = "cpu"
    description = "Example plug-in (tests/plugins/example_backend): MoE routing ops in plain torch"

    def probe(self) -> Probe:
        # Cheap on purpose: find_spec looks for the package without importing it.
        if importlib.util.find_spec("torch") is None:
            return Probe(False, "torch is not installed")
        return Probe(True, "plain torch on the CPU", {"torch": True})

    def offers(self) -> dict[str, tuple[str, ...]]:
        # Optional: what load() registers, shown by `dsv4rt info --matrix` where the backend cannot load.
        return {op: ("torch",) for op in OPS}

    def load(self, registrar: Registrar) -> None:
        for op, fn in zip(OPS, (moe_route, moe_dispatch, moe_combine)):
            registrar.implement(op, "torch", fn, priority=PRIORITY, requires=("torch",))


def backend() -> ExampleBackend:
    """The entry point: a zero-argument factory returning the backend."""
    return ExampleBackend()
