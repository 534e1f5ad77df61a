"""The parallel layout of a multi-process run: who holds which heads, vocabulary rows and experts, and the
process groups the model's collectives run on.

Ranks are split into tensor-parallel (TP) groups of ``tp`` consecutive ranks and expert-parallel (EP) groups
of ``ep`` consecutive ranks; ``tp`` and ``ep`` each divide the world size. Every rank sees the same tokens
(the run is one batch, replicated), so groups of the same kind compute the same thing. Within a TP group,
rank ``i`` holds query heads / ``wo_a`` groups / indexer heads ``[i*n/tp, (i+1)*n/tp)`` and vocabulary rows
``split_range(vocab, tp, i)``; within an EP group, rank ``i`` owns routed experts ``[i*E/ep, (i+1)*E/ep)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["split_range", "tp_problems", "ep_problems", "default_layout", "check_layout", "Parallel"]


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``n`` items are cut into ``parts`` chunks of ``ceil(n/parts)``
    (the last ones shorter or empty): the even split when ``parts`` divides ``n``."""
    chunk = -(-n // parts)
    a = min(n, index * chunk)
    return a, min(n, a + chunk)


def tp_problems(cfg: Any, tp: int) -> list[str]:
    """Why attention cannot be split over ``tp`` ranks (empty when it can)."""
    out = []
    blk = getattr(cfg, "fp8_block", 128)
    if cfg.n_heads % tp or cfg.o_groups % tp:
        out.append(f"n_heads {cfg.n_heads} and o_groups {cfg.o_groups} must be multiples of tp {tp}")
    elif (cfg.n_heads // tp * cfg.head_dim) % blk or (cfg.o_groups // tp * cfg.o_lora_rank) % blk:
        out.append(f"each rank's wq_b rows and wo_a / wo_b groups must fill whole {blk}-wide FP8 scale blocks "
                   f"(tp {tp})")
    if any(cfg.kind(i) in ("csa", "csa2") for i in range(cfg.n_layers + cfg.n_mtp_layers)):
        if cfg.index_n_heads % tp or (cfg.index_n_heads // tp * cfg.index_head_dim) % blk:
            out.append(f"index_n_heads {cfg.index_n_heads} must be a multiple of tp {tp} with whole scale blocks")
    return out


def ep_problems(cfg: Any, ep: int) -> list[str]:
    """Why the routed experts cannot be split over ``ep`` ranks (empty when they can)."""
    return [] if cfg.n_routed_experts % ep == 0 else [
        f"n_routed_experts {cfg.n_routed_experts} must be a multiple of ep {ep}"]


def default_layout(cfg: Any, world: int) -> tuple[int, int]:
    """(tp, ep): the largest divisors of ``world`` the config accepts (normally tp = ep = world)."""
    divisors = [d for d in range(world, 0, -1) if world % d == 0]
    return (next(d for d in divisors if not tp_problems(cfg, d)), next(d for d in divisors if not ep_problems(cfg, d)))


def check_layout(cfg: Any, world: int, tp: int, ep: int) -> None:
    """ValueError naming every reason why ``tp`` x ``ep`` does not fit ``world`` ranks and the config."""
    bad = [f"{name} {v} does not divide the world size {world}" for name, v in (("tp", tp), ("ep", ep))
           if v < 1 or world % v]
    if not bad:
        bad = tp_problems(cfg, tp) + ep_problems(cfg, ep)
    if bad:
        raise ValueError("parallel layout: " + "; ".join(bad))


@dataclass
class Parallel:
    """One rank's view of the layout plus its process groups (``None`` group = the default, whole world).

    The model calls only the methods below (duck-typed: ``dsv4rt.model`` never imports this package)."""

    world: int
    rank: int
    tp: int
    ep: int
    backend: str = "gloo"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: Any = None
    ep_group: Any = None

    @classmethod
    def create(cls, cfg: Any, tp: int | None = None, ep: int | None = None,
               device: torch.device | str = "cpu") -> "Parallel":
        """The layout of the initialised default process group (every rank calls this, in the same order:
        it creates the sub-groups). ``tp`` / ``ep`` None: :func:`default_layout`."""
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        dtp, dep = default_layout(cfg, world)
        tp, ep = tp or dtp, ep or dep
        check_layout(cfg, world, tp, ep)
        groups = {}
        for size in sorted({tp, ep}):
            if 1 < size < world:
                for g in range(world // size):
                    ranks = list(range(g * size, (g + 1) * size))
                    pg = dist.new_group(ranks)
                    if rank in ranks:
                        groups[size] = pg
        return cls(world, rank, tp, ep, dist.get_backend(), torch.device(device), groups.get(tp), groups.get(ep))

    # ---- positions ---------------------------------------------------------------------------------
    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    def tp_ranks(self) -> list[int]:
        return list(range(self.rank - self.tp_rank, self.rank - self.tp_rank + self.tp))

    def ep_ranks(self) -> list[int]:
        return list(range(self.rank - self.ep_rank, self.rank - self.ep_rank + self.ep))

    def tp_range(self, n: int) -> tuple[int, int]:
        """This rank's part of ``n`` rows split over the TP group."""
        return split_range(n, self.tp, self.tp_rank)

    def ep_experts(self, n_experts: int) -> tuple[int, int]:
        """(first, count) of the routed experts this rank owns."""
        k = n_experts // self.ep
        return self.ep_rank * k, k

    # ---- collectives the model calls ---------------------------------------------------------------
    def tp_sum(self, x: Tensor) -> Tensor:
        """All-reduce (sum) over the TP group, in place; returns x."""
        import torch.distributed as dist

        dist.all_reduce(x, group=self.tp_group)
        return x

    def embed(self, table: Tensor, ids: Tensor, vocab: int) -> Tensor:
        from .tp import vocab_parallel_embed

        return vocab_parallel_embed(table, ids, self.tp_range(vocab), self.tp_group)

    def gather_vocab(self, logits: Tensor, vocab: int) -> Tensor:
        from .tp import gather_vocab

        return gather_vocab(logits, vocab, self.tp, self.tp_group)

    def indexer_topk(self, ops: Any, q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int) -> Tensor:
        """The head-split indexer (:func:`dsv4rt.distributed.tp.indexer_topk`); recorded in ``ops.used()``."""
        from .tp import indexer_topk

        ops.calls[("indexer_topk", "tensor-parallel: partial indexer_scores + all_reduce + topk")] += 1
        return indexer_topk(q, k, weights, visible, topk, self.tp_group)

    # ---- V4.1 -----------------------------------------------------------------------------------------
    def indexer_scores(self, ops: Any, q: Tensor, k: Tensor, weights: Tensor, visible: Tensor,
                       k_scale: Tensor | None) -> Tensor:
        """The head-split score matrix (:func:`dsv4rt.distributed.tp.indexer_scores`): partial scores of this
        rank's heads summed over the group, rounded as the release's (bf16 partials, a bf16 sum) in release
        precision, fp32 in fp32 precision; recorded in ``ops.used()``."""
        from .tp import indexer_scores

        ops.calls[("indexer_scores", "tensor-parallel: partial indexer_scores + all_reduce")] += 1
        return indexer_scores(q, k, weights, visible, self.tp_group, k_scale=k_scale, score_dtype=ops._p_dtype)

    def indexer_topk_v41(self, ops: Any, q: Tensor, k: Tensor, weights: Tensor, visible: Tensor, topk: int,
                         k_scale: Tensor | None, candidates: Tensor | None) -> Tensor:
        """V4.1's head-split top-k: reduced scores, then the candidate mask and position order of the op."""
        from .tp import indexer_topk

        ops.calls[("indexer_topk", "tensor-parallel: partial indexer_scores + all_reduce + topk")] += 1
        return indexer_topk(q, k, weights, visible, topk, self.tp_group, k_scale=k_scale, candidates=candidates,
                            sorted_output=True, score_dtype=ops._p_dtype)

    def engram_lookup(self, ops: Any, ids: Tensor, weight_part: Tensor, scale_part: Tensor, part: tuple[int, int],
                      out_dtype: Any) -> Tensor:
        """Rows of a row-sharded Engram table (:func:`dsv4rt.distributed.tp.engram_parallel_lookup`)."""
        from .tp import engram_parallel_lookup

        ops.calls[("engram_lookup", "tensor-parallel: row-sharded engram_lookup + all_reduce")] += 1
        return engram_parallel_lookup(ids, weight_part, scale_part, part, self.tp_group, out_dtype)

    def moe(self, moe: Any, ops: Any, x: Tensor, token_ids: Tensor) -> Tensor:
        from .moe import ep_moe_forward

        return ep_moe_forward(moe, ops, x, token_ids, self.ep, self.ep_rank, self.ep_group)

    def same_tokens(self, tokens: Tensor) -> Tensor:
        """Rank 0's sampled tokens on every rank (so all ranks feed the same next step)."""
        import torch.distributed as dist

        tokens = tokens.contiguous()
        dist.broadcast(tokens, src=0)
        return tokens
