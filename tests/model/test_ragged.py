"""``Transformer.forward_ragged``: sequences at independent positions in one forward (decode tokens and
prefill chunks mixed, joining and leaving mid-run) give each sequence what running it alone gives."""
from __future__ import annotations

import pytest
import torch

from dsv4rt.model.config import preset
from dsv4rt.model.kvpool import KVPool, slot_bytes
from dsv4rt.model.synthetic import SyntheticSource
from dsv4rt.model.transformer import Transformer

MAX_LEN = 224          # past the 128-token window and one ratio-128 block of the tiny preset


def _model(precise: bool) -> Transformer:
    cfg = preset("tiny")
    src = SyntheticSource(cfg, seed=5, fast=True, mtp=False)
    if precise:
        return Transformer(cfg, src, dtype=torch.float32, quant=False, precision="fp32")
    return Transformer(cfg, src)


# (join step, prompt length, prefill chunk, generated tokens): the second joins mid-run with a chunked
# prefill beside the first one's decode; the fourth takes the slot the first one frees
PLAN = [(0, 120, 64, 40), (2, 37, 16, 30), (5, 1, 1, 60), (44, 140, 100, 20)]


def _run_ragged(model: Transformer, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    pool = KVPool(model, 3 * slot_bytes(model, MAX_LEN), MAX_LEN)
    assert pool.n_slots == 3
    fed = [0] * len(PLAN)
    out: list[list[int]] = [[] for _ in PLAN]
    logits: list[list[torch.Tensor]] = [[] for _ in PLAN]
    live: dict[int, tuple[int, object]] = {}
    step = 0
    while any(len(out[k]) < PLAN[k][3] for k in range(len(PLAN))):
        for k, (join, *_rest) in enumerate(PLAN):
            if join == step or (join < step and k not in live and not out[k] and fed[k] == 0):
                got = pool.alloc()
                if got is not None:
                    live[k] = got
        batch, keys = [], []
        for k, (slot, view) in live.items():
            n_prompt, chunk = PLAN[k][1], PLAN[k][2]
            if fed[k] < n_prompt:
                toks = prompts[k][fed[k]:fed[k] + chunk]
            else:
                toks = [out[k][-1]]
            fed[k] += len(toks)
            batch.append(torch.tensor(toks))
            keys.append(k)
        if batch:
            res = model.forward_ragged(batch, [live[k][1] for k in keys])
            for row, k in enumerate(keys):
                if fed[k] >= PLAN[k][1]:
                    logits[k].append(res[row])
                    out[k].append(int(res[row].argmax()))
                    if len(out[k]) == PLAN[k][3]:
                        pool.free(live.pop(k)[0])
        step += 1
        assert step < 400
    assert pool.used == 0
    return out, logits


def _run_alone(model: Transformer, prompt: list[int], feed: list[int]) -> list[torch.Tensor]:
    """Logits of one sequence alone, fed the same tokens (teacher forcing on the ragged run's output)."""
    cache = model.new_cache(1, MAX_LEN)
    res = [model.forward(torch.tensor([prompt]), cache)[0]]
    for t in feed[:-1]:
        res.append(model.forward(torch.tensor([[t]]), cache)[0])
    return res


def _prompts(model: Transformer) -> list[list[int]]:
    g = torch.Generator().manual_seed(17)
    return [torch.randint(3, model.cfg.vocab_size, (p[1],), generator=g).tolist() for p in PLAN]


def test_ragged_fp32_matches_each_sequence_alone():
    model = _model(precise=True)
    prompts = _prompts(model)
    out, logits = _run_ragged(model, prompts)
    for k in range(len(PLAN)):
        ref = _run_alone(model, prompts[k], out[k])
        assert len(ref) == len(logits[k]) == PLAN[k][3]
        for step, (a, b) in enumerate(zip(ref, logits[k])):
            err = float((a - b).abs().max())
            assert err <= 1e-4, f"sequence {k} step {step}: logits differ by {err:.3g}"
        assert out[k] == [int(x.argmax()) for x in ref]


def test_ragged_release_precision_same_top1():
    model = _model(precise=False)
    prompts = _prompts(model)
    out, logits = _run_ragged(model, prompts)
    same = total = 0
    for k in range(len(PLAN)):
        ref = _run_alone(model, prompts[k], out[k])
        same += sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(ref, logits[k]))
        total += len(ref)
    assert same / total >= 0.95, f"top-1 agrees on {same}/{total} steps"


def test_ragged_refuses_bad_steps():
    model = _model(precise=True)
    pool = KVPool(model, 2 * slot_bytes(model, 32), 32)
    (_, a), (_, b) = pool.alloc(), pool.alloc()
    with pytest.raises(ValueError, match="token chunks for 2 caches"):
        model.forward_ragged([torch.tensor([3])], [a, b])
    with pytest.raises(ValueError, match="same cache appears twice"):
        model.forward_ragged([torch.tensor([3]), torch.tensor([4])], [a, a])
    with pytest.raises(ValueError, match=r"tokens\[1\] must be 1-D"):
        model.forward_ragged([torch.tensor([3]), torch.tensor([[4]])], [a, b])
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        model.forward_ragged([torch.tensor([3] * 33)], [a])
    assert a.pos == b.pos == 0


def test_ragged_over_separate_caches():
    """Caches that are not views of one pool (the concatenating fallback) give the same logits."""
    model = _model(precise=True)
    g = torch.Generator().manual_seed(23)
    prompts = [torch.randint(3, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 130)]
    caches = [model.new_cache(1, MAX_LEN) for _ in prompts]
    first = model.forward_ragged([torch.tensor(p) for p in prompts], caches)
    feeds = [[int(first[i].argmax())] for i in range(2)]
    got = [[first[0]], [first[1]]]
    for _ in range(6):
        res = model.forward_ragged([torch.tensor(f[-1:]) for f in feeds], caches)
        for i in range(2):
            got[i].append(res[i])
            feeds[i].append(int(res[i].argmax()))
    for i in range(2):
        ref = _run_alone(model, prompts[i], feeds[i])
        for a, b in zip(ref, got[i]):
            assert float((a - b).abs().max()) <= 1e-4
