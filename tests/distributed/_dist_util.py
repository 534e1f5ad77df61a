"""Spawning gloo process groups on 127.0.0.1 for the distributed tests (a free port from binding port 0), and
the model runs the parallel-model tests compare (the same code in one process and in every rank)."""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable, Iterator

import torch
import torch.multiprocessing as mp

DEADLINE_S = 240  # a hung collective fails the test instead of hanging the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, target: Callable[..., Any], args: tuple) -> None:
    import torch.distributed as dist

    for k in [k for k in os.environ if k.startswith(("DSV4RT_", "TRITON_"))]:
        del os.environ[k]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        target(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(target: Callable[..., Any], world: int, *args: Any) -> None:
    """Run ``target(rank, world, *args)`` in ``world`` fresh processes joined in one gloo group; re-raises
    a worker's exception, and fails (killing the workers) after DEADLINE_S."""
    ctx = mp.start_processes(_entry, args=(world, free_port(), target, args), nprocs=world, join=False,
                             start_method="spawn")
    end = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > end:
                raise TimeoutError(f"distributed workers ({world} ranks) did not finish in {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def fp32_and_bf16_models(path: str, par: Any = None) -> Iterator[tuple[str, Any]]:
    """The checkpoint at ``path`` as ("fp32", unquantised float32) then ("bf16", release precision), built with
    the parallel layout ``par`` (None: one process)."""
    from dsv4rt.model.checkpoint import Checkpoint
    from dsv4rt.model.transformer import Transformer

    ck = Checkpoint(path)
    yield "fp32", Transformer(ck.cfg, ck, dtype=torch.float32, quant=False, par=par)
    yield "bf16", Transformer(ck.cfg, ck, par=par)


def teacher_forced_logits(model: Any, tokens: torch.Tensor, prefill: int, backend: str,
                          chunk: int | None = None) -> torch.Tensor:
    """[1, T, V]: the first ``prefill`` positions (in calls of ``chunk`` tokens; None: one call), then one decode
    step per remaining token of ``tokens`` [1, T], all on ``backend``."""
    import dsv4rt

    chunk = chunk or prefill
    with dsv4rt.use_backend(backend):
        cache = model.new_cache(1, max_seq_len=256)
        out = [model.forward(tokens[:, i:i + chunk], cache, all_logits=True) for i in range(0, prefill, chunk)]
        for i in range(prefill, tokens.shape[1]):
            out.append(model.forward(tokens[:, i:i + 1], cache, all_logits=True))
    return torch.cat(out, dim=1)
