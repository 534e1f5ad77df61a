"""The batch-invariant mode on the model: every sequence's logits are bit-identical alone, in a batch, and
joining a batch that is already decoding, on each CPU backend (cpu/native, cpu/numpy, cpu/torch for every
op). Prompts long enough to wrap the 128-token window and complete HCA blocks; one-token prompts too.
"""
from __future__ import annotations

import random

import pytest
import torch

import dsv4rt
from dsv4rt import invariant
from dsv4rt.model.kvpool import KVPool, slot_bytes

try:
    from dsv4rt import _C  # noqa: F401
    BACKENDS = ["cpu/native", "cpu/numpy", "cpu/torch"]
except ImportError:  # pragma: no cover - the extension was not built
    BACKENDS = ["cpu/numpy", "cpu/torch"]

LENS = (1, 17, 130, 200, 40)
DECODE = 4
SEQ_LEN = 256


@pytest.fixture(scope="module")
def model(tiny_ckpt, build):
    return build(tiny_ckpt, dtype=torch.bfloat16)


def _prompts() -> list[list[int]]:
    rnd = random.Random(0)
    return [[0] + [rnd.randrange(3, 258) for _ in range(n - 1)] for n in LENS]


def _run(model, prompts: list[list[int]], starts: list[int]) -> list[list[torch.Tensor]]:
    """Each sequence's logits per step; sequence j is prefilled at step starts[j] and then decodes DECODE
    tokens (the argmax of its previous logits, folded into the byte range), sharing each step with the
    others running then."""
    pool = KVPool(model, len(prompts) * slot_bytes(model, SEQ_LEN), SEQ_LEN)
    caches = [pool.alloc()[1] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    nxt = [0] * len(prompts)
    for step in range(max(starts) + DECODE + 1):
        who = [j for j in range(len(prompts)) if starts[j] <= step <= starts[j] + DECODE]
        if not who:
            continue
        toks = [torch.tensor(prompts[j] if step == starts[j] else [nxt[j]]) for j in who]
        out = model.forward_ragged(toks, [caches[j] for j in who])
        for row, j in enumerate(who):
            logits[j].append(out[row].clone())
            nxt[j] = 3 + int(out[row].argmax()) % 256
    return logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_do_not_depend_on_the_batch(model, backend):
    prompts = _prompts()
    with torch.inference_mode(), dsv4rt.use_backend(backend), invariant.mode(True):
        alone = [_run(model, [p], [0])[0] for p in prompts]
        together = _run(model, prompts, [0] * len(prompts))
        staggered = _run(model, prompts, [j % 3 for j in range(len(prompts))])
    for j in range(len(prompts)):
        assert len(alone[j]) == DECODE + 1
        for step, (a, b, c) in enumerate(zip(alone[j], together[j], staggered[j])):
            assert torch.equal(a, b), f"sequence {j} (prompt of {LENS[j]}) step {step}: alone != together"
            assert torch.equal(a, c), f"sequence {j} (prompt of {LENS[j]}) step {step}: alone != staggered"
