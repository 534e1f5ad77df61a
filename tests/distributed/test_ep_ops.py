"""ep_dispatch / ep_combine over 2 and 4 gloo processes equal the single-device moe_dispatch / moe_combine of
all ranks' tokens (concatenated in rank order): bitwise for the data movement and the combine, within the
GEMM tolerance for fp4_grouped_gemm on each rank's local experts. Ranks with zero tokens and ranks whose
experts receive no row take part in every case."""
from __future__ import annotations

import pytest
import torch

from _dist_util import spawn

E, TOPK, H, N = 8, 2, 64, 32
TOKENS = (5, 0, 7, 3)  # rank 1 brings no tokens


def _case(world: int, seed: int, kind: str, dtype: torch.dtype):
    """Every rank's (x, ids, weights), the same on every process (seeded)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(world):
        t = TOKENS[r]
        x = torch.randn(t, H, generator=g).to(dtype)
        if kind == "forced":       # nothing for the last rank's experts
            pool = E - E // world
            ids = torch.stack([torch.randperm(pool, generator=g)[:TOPK] for _ in range(t)]) if t else None
        elif kind == "one":        # every copy of token t goes to expert 0 or 1: most experts get nothing
            ids = torch.tensor([[0, 1]] * t) if t else None
        else:
            ids = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(t)]) if t else None
        ids = (ids if ids is not None else torch.zeros(0, TOPK, dtype=torch.long)).to(torch.int32)
        w = torch.rand(t, TOPK, generator=g)
        out.append((x, ids, w))
    return out


def _fp4_weights():
    g = torch.Generator().manual_seed(7)
    w = torch.randint(0, 256, (E, N, H // 2), generator=g, dtype=torch.uint8)
    s = torch.randint(120, 130, (E, N, H // 32), generator=g, dtype=torch.uint8)
    return w, s


def worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    import dsv4rt
    from dsv4rt import ops
    from dsv4rt.distributed import ep_combine, ep_dispatch

    local = E // world
    lo = rank * local
    w4, s4 = _fp4_weights()
    seen_empty_recv = seen_empty_tokens = 0
    with dsv4rt.use_backend("cpu"):
        for seed, kind, dtype in ((0, "random", torch.float32), (1, "forced", torch.bfloat16),
                                  (2, "one", torch.float32), (3, "random", torch.bfloat16)):
            parts = _case(world, seed, kind, dtype)
            x = torch.cat([p[0] for p in parts])
            ids = torch.cat([p[1] for p in parts])
            w = torch.cat([p[2] for p in parts])
            xs, off, src = ops.moe_dispatch(x, ids, E)                         # the single-device result
            w_rows = w.reshape(-1)[src.long()]
            a, b = int(off[lo]), int(off[lo + local])
            mx, mids, mw = parts[rank]
            t0 = sum(TOKENS[:rank])
            xl, offl, wl, h = ep_dispatch(mx, mids, E, None, mw)
            where = f"rank {rank} case {kind}/{dtype}"
            assert torch.equal(xl, xs[a:b]), where
            assert torch.equal(offl, off[lo:lo + local + 1] - off[lo]), where
            assert torch.equal(wl, w_rows[a:b]), where
            seen_empty_recv += int(xl.shape[0] == 0)
            seen_empty_tokens += int(mx.shape[0] == 0)
            # combine: a row-wise function of the dispatched rows, weighted and unweighted
            expert = torch.repeat_interleave(torch.arange(E), (off[1:] - off[:-1]).long())
            y_all = xs.float() * 3 + expert[:, None]
            loc_expert = lo + torch.repeat_interleave(torch.arange(local), (offl[1:] - offl[:-1]).long())
            y_loc = xl.float() * 3 + loc_expert[:, None]
            for weights in (w, None):
                ref = ops.moe_combine(y_all, src, weights, None if weights is not None else TOPK)
                got = ep_combine(y_loc, h, None if weights is None else mw)
                assert torch.equal(got, ref[t0:t0 + mx.shape[0]]), (where, weights is None)
            # the expert GEMM on the local experts only
            if xl.shape[0]:
                ref = ops.fp4_grouped_gemm(xs, w4, s4, off, None)[a:b].float()
                got = ops.fp4_grouped_gemm(xl, w4[lo:lo + local], s4[lo:lo + local], offl, None).float()
                assert torch.allclose(got, ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item()), where
    flags = torch.tensor([seen_empty_recv, seen_empty_tokens])
    dist.all_reduce(flags)
    assert flags[0] > 0 and flags[1] > 0, "the cases must include ranks receiving nothing and ranks sending nothing"


@pytest.mark.parametrize("world", [2, 4])
def test_ep_dispatch_combine_match_single_device(world):
    spawn(worker, world)
