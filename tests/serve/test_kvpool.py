"""Sequences in pool slots at independent positions give the logits of running each alone."""
import torch

from dsv4rt.model.config import preset
from dsv4rt.model.kvpool import KVPool, slot_bytes
from dsv4rt.model.synthetic import SyntheticSource
from dsv4rt.model.transformer import Transformer


def _model():
    cfg = preset("tiny")
    return Transformer(cfg, SyntheticSource(cfg, seed=3, fast=True, mtp=False), dtype=torch.float32, quant=False)


def _alone(model, prompt, steps):
    cache = model.new_cache(1, 64)
    out = [model.forward(torch.tensor([prompt]), cache)]
    for t in steps:
        out.append(model.forward(torch.tensor([[t]]), cache))
    return out


def test_pool_slots_match_alone_with_join_and_leave():
    model = _model()
    g = torch.Generator().manual_seed(11)
    v = model.cfg.vocab_size
    prompts = [torch.randint(3, v, (n,), generator=g).tolist() for n in (5, 9, 3)]
    steps = [torch.randint(3, v, (n,), generator=g).tolist() for n in (12, 6, 8)]
    pool = KVPool(model, 2 * slot_bytes(model, 64), 64)
    assert pool.n_slots == 2 and pool.cache.nbytes() == 2 * pool.slot_bytes
    got = {0: [], 1: [], 2: []}
    live = {}
    for k in (0, 1):
        live[k] = pool.alloc()
        got[k].append(model.forward(torch.tensor([prompts[k]]), live[k][1]))
    assert pool.alloc() is None
    pending = [2]
    while live:
        for k in list(live):
            slot, view = live[k]
            n = len(got[k]) - 1
            if n == len(steps[k]):
                pool.free(slot)
                del live[k]
                if pending:                      # a sequence joins in the freed slot mid-run
                    j = pending.pop()
                    live[j] = pool.alloc()
                    got[j].append(model.forward(torch.tensor([prompts[j]]), live[j][1]))
                continue
            got[k].append(model.forward(torch.tensor([[steps[k][n]]]), view))
    for k in range(3):
        ref = _alone(model, prompts[k], steps[k])
        assert len(ref) == len(got[k])
        for a, b in zip(ref, got[k]):
            assert torch.allclose(a, b, atol=1e-4, rtol=0), (k, (a - b).abs().max())


import pytest  # noqa: E402

from dsv4rt.model.cache import KVCache  # noqa: E402
from dsv4rt.model.kvsize import allocated_bytes  # noqa: E402


@pytest.mark.parametrize("name", ["tiny", "flash", "pro", "flash-slice"])
@pytest.mark.parametrize("context", [128, 4096, 1 << 20])
@pytest.mark.parametrize("mtp", [False, True])
def test_kv_cache_figures_match_what_the_pool_allocates(name, context, mtp):
    """`dsv4rt kv-cache`'s allocated figure is an independent formula; the pool's slots are real tensors."""
    cfg = preset(name)
    for dtype, nbytes in ((torch.bfloat16, 2), (torch.float32, 4)):
        real = KVCache(cfg, 1, context, dtype, "meta", mtp=mtp).nbytes()
        assert allocated_bytes(cfg, context, nbytes, mtp) == real


def test_kv_cache_report_prints_the_pool_figure(capsys):
    from dsv4rt.cli import main

    model = _model()
    assert main(["kv-cache", "--preset", "tiny", "--context", "256"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("dsv4rt allocates")][0]
    bf16 = KVCache(model.cfg, 1, 256, torch.bfloat16, "meta").nbytes()
    assert f"({bf16:,} bytes)" in line


@pytest.mark.parametrize("bad", [0.0, 1.0, True, False, 0.5, "0", None])
def test_free_refuses_slot_ids_that_are_not_ints(bad):
    """0.0 and True equal slot ids 0 / 1: free() took them and put a float / bool into the free list, which
    a later alloc() handed out as a slot. They are refused; the pool stays as it was."""
    import numpy as np

    model = _model()
    pool = KVPool(model, 2 * slot_bytes(model, 64), 64)
    slots = [pool.alloc()[0], pool.alloc()[0]]
    with pytest.raises(TypeError, match=r"KV pool: slot must be an int"):
        pool.free(bad)
    assert pool.used == 2 and pool.alloc() is None
    pool.free(np.int64(slots[1]))                      # an integer of another type is an id
    assert pool.used == 1
    slot, _ = pool.alloc()
    assert type(slot) is int and slot == slots[1]
    with pytest.raises(ValueError, match=r"slot 7 is not allocated"):
        pool.free(7)
