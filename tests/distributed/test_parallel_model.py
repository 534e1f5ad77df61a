"""The tiny preset over 2 and 4 gloo processes (expert parallel, tensor parallel, both) gives the logits of the
single-process run, and every rank reads only its own part of the checkpoint.

Two precisions, as the model tests:

* float32 activations with the quantisation points off: the parallel run differs from one process only by
  summation order (wo_b partial sums and indexer scores all-reduced across ranks, GEMMs over token slices),
  so logits agree to float rounding (observed ~1e-6; any layout mistake moves them by O(1)).
* the reference precision (BF16 activations, FP8/FP4 simulation): a last-bit difference can flip an FP8
  rounding, an FP4 code or a top-k choice and the flip propagates, so it is checked statistically.

Each case runs a 100-token prefill (the indexer's top-16 really selects: up to 25 compressed entries are
visible) and 4 one-token decode steps, where the ranks of an EP group but one have no token of their own and,
with 4 ranks and 2 experts per token, at least two ranks' experts receive nothing.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

from _dist_util import fp32_and_bf16_models, spawn, teacher_forced_logits

PREFILL, DECODE = 100, 4
LAYOUTS = {2: [(1, 2, "tiny"), (2, 1, "tiny"), (2, 2, "tiny")],
           4: [(1, 4, "tiny"), (4, 1, "og4"), (4, 4, "og4"), (2, 4, "tiny")]}


def _tokens():
    return torch.randint(3, 259, (1, PREFILL + DECODE), generator=torch.Generator().manual_seed(11))


def _logits(model):
    """[1, PREFILL + DECODE, V]: all prefill positions, then each decode step's."""
    return teacher_forced_logits(model, _tokens(), PREFILL, "cpu")


def worker(rank: int, world: int, paths: dict, out_dir: str) -> None:
    import dsv4rt.distributed.moe as dmoe
    from dsv4rt.distributed import Parallel
    from dsv4rt.model.checkpoint import Checkpoint
    from dsv4rt.model.shard import ShardFile

    reads: list = []
    orig_read, orig_dispatch = ShardFile.read, dmoe.ep_dispatch

    def read(self, name, dim=None, start=0, stop=None):
        reads.append((name, dim, start, stop))
        return orig_read(self, name, dim, start, stop)

    stats = {"no_tokens": 0, "no_rows": 0, "calls": 0}

    def dispatch(x, *args, **kw):
        res = orig_dispatch(x, *args, **kw)
        stats["calls"] += 1
        stats["no_tokens"] += int(x.shape[0] == 0)
        stats["no_rows"] += int(res[0].shape[0] == 0)
        return res

    ShardFile.read, dmoe.ep_dispatch = read, dispatch
    for tp, ep, ck_name in LAYOUTS[world]:
        par = Parallel.create(Checkpoint(paths[ck_name]).cfg, tp, ep)
        stats.update(no_tokens=0, no_rows=0, calls=0)
        result = {"reads": {}, "logits": {}}
        for mode, model in fp32_and_bf16_models(paths[ck_name], par):
            result["reads"][mode] = reads[:]
            reads.clear()
            result["logits"][mode] = _logits(model)
        result["stats"] = dict(stats)
        torch.save(result, os.path.join(out_dir, f"w{world}-tp{tp}-ep{ep}-{ck_name}-rank{rank}.pt"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_dir):
    """The tiny preset and a variant with 4 wo_a groups (tiny's 2 groups allow at most tp = 2)."""
    from dsv4rt.model.checkpoint import write_checkpoint
    from dsv4rt.model.config import preset
    from dsv4rt.model.synthetic import SyntheticSource

    cfg = preset("tiny", o_groups=4)
    src = SyntheticSource(cfg, 0, mtp=True)
    og4 = write_checkpoint(str(tmp_path_factory.mktemp("og4") / "tiny-og4"), cfg,
                           ((n, src.get(n)) for n in src.names()), max_shard_bytes=4 << 20)
    return {"tiny": tiny_dir, "og4": og4}


@pytest.fixture(scope="module")
def references(checkpoints):
    torch.set_num_threads(1)
    return {name: {mode: _logits(m) for mode, m in fp32_and_bf16_models(path)} for name, path in checkpoints.items()}


@pytest.fixture(scope="module", params=[2, 4])
def parallel_runs(request, checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"par{request.param}")
    spawn(worker, request.param, checkpoints, str(out))
    runs = {}
    for f in sorted(os.listdir(out)):
        m = re.match(r"w\d+-tp(\d+)-ep(\d+)-(\w+?)-rank(\d+)\.pt", f)
        runs.setdefault((int(m[1]), int(m[2]), m[3]), {})[int(m[4])] = torch.load(out / f)
    return request.param, runs


def test_logits_match_single_process(parallel_runs, references):
    world, runs = parallel_runs
    assert sorted(runs) == sorted((tp, ep, c) for tp, ep, c in LAYOUTS[world])
    for (tp, ep, ck), ranks in runs.items():
        assert sorted(ranks) == list(range(world))
        ref32, ref16 = references[ck]["fp32"], references[ck]["bf16"]
        for r, res in ranks.items():
            got = res["logits"]["fp32"]
            assert torch.equal(got, ranks[0]["logits"]["fp32"]), "every rank must hold the same logits"
            err = (got - ref32).abs().max().item()
            assert err < 1e-3, f"tp {tp} ep {ep} rank {r}: fp32 max |logit diff| {err}"
        got = ranks[0]["logits"]["bf16"]
        per_pos = (got - ref16).abs().amax(-1)[0]
        top1 = (got.argmax(-1) == ref16.argmax(-1)).float().mean().item()
        assert torch.isfinite(got).all()
        assert per_pos.median().item() < 0.05 and top1 > 0.9, (tp, ep, per_pos.median().item(), top1)


def test_ranks_without_tokens_took_part(parallel_runs):
    world, runs = parallel_runs
    for (tp, ep, ck), ranks in runs.items():
        if ep == 1:
            continue
        total = {k: sum(res["stats"][k] for res in ranks.values()) for k in ("no_tokens", "no_rows", "calls")}
        assert total["calls"] > 0 and total["no_tokens"] > 0, (tp, ep, total)
        if ep == 4:
            assert total["no_rows"] > 0, (tp, ep, total)


_SHARDED = {  # name suffix -> (dim, rows of the whole tensor as a function of the config)
    "attn.wq_b.weight": (0, lambda c: c.n_heads * c.head_dim),
    "attn.wq_b.scale": (0, lambda c: c.n_heads * c.head_dim // 128),
    "attn.wo_a.weight": (0, lambda c: c.o_groups * c.o_lora_rank),
    "attn.wo_a.scale": (0, lambda c: c.o_groups * c.o_lora_rank // 128),
    "attn.wo_b.weight": (1, lambda c: c.o_groups * c.o_lora_rank),
    "attn.wo_b.scale": (1, lambda c: c.o_groups * c.o_lora_rank // 128),
    "attn.attn_sink": (0, lambda c: c.n_heads),
    "indexer.wq_b.weight": (0, lambda c: c.index_n_heads * c.index_head_dim),
    "indexer.wq_b.scale": (0, lambda c: c.index_n_heads * c.index_head_dim // 128),
    "indexer.weights_proj.weight": (0, lambda c: c.index_n_heads),
}


def _owned(name, cfg, tp, ep, rank):
    """(dim, start, stop) this rank may read of ``name``, None for the whole tensor, False for nothing."""
    m = re.search(r"\.ffn\.experts\.(\d+)\.", name)
    if m:
        k = cfg.n_routed_experts // ep
        return None if (rank % ep) * k <= int(m[1]) < (rank % ep + 1) * k else False
    if tp == 1:
        return None
    if name in ("embed.weight", "head.weight"):
        chunk = -(-cfg.vocab_size // tp)
        a = min(cfg.vocab_size, rank % tp * chunk)
        return 0, a, min(cfg.vocab_size, a + chunk)
    for suffix, (dim, rows) in _SHARDED.items():
        if name.endswith(suffix):
            n = rows(cfg) // tp
            return dim, rank % tp * n, (rank % tp + 1) * n
    return None


def _byte_ranges(entry, dim, start, stop):
    """The byte intervals of the file a slice covers."""
    import math

    shape, size = entry.shape, entry.nbytes // max(1, math.prod(entry.shape))
    if dim is None:
        return [(entry.start, entry.end)]
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    row = shape[dim] * inner * size
    return [(entry.start + o * row + start * inner * size, entry.start + o * row + stop * inner * size)
            for o in range(outer)]


def test_no_rank_reads_a_slice_it_does_not_own(parallel_runs, checkpoints):
    from dsv4rt.model.checkpoint import Checkpoint

    world, runs = parallel_runs
    for (tp, ep, ck_name), ranks in runs.items():
        ck = Checkpoint(checkpoints[ck_name])
        covered: dict = {}
        for r, res in ranks.items():
            reads = res["reads"]["fp32"]
            assert len(reads) == len({n for n, *_ in reads}), "a tensor was read twice"
            for name, dim, start, stop in reads:
                own = _owned(name, ck.cfg, tp, ep, r)
                assert own is not False, f"tp {tp} ep {ep} rank {r} read {name}, which it does not own"
                got = None if dim is None else (dim, start, stop)
                assert got == own, f"tp {tp} ep {ep} rank {r} read {name} {got}, owns {own}"
                if own is not None:
                    covered.setdefault((r // tp, name), []).extend(_byte_ranges(ck.entry(name), dim, start, stop))
            read_bytes = sum(b - a for n, d, s, e in reads for a, b in _byte_ranges(ck.entry(n), d, s, e))
            assert read_bytes < sum(ck.entry(n).nbytes for n in ck.names() if not n.startswith("mtp."))
        # the TP ranks of a group read disjoint byte ranges that together make up each sharded tensor
        for (_, name), ranges in covered.items():
            ranges.sort()
            assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), f"overlapping reads of {name}"
            e = ck.entry(name)
            assert sum(b - a for a, b in ranges) == e.nbytes and ranges[0][0] == e.start and ranges[-1][1] == e.end
        assert covered or tp == 1
