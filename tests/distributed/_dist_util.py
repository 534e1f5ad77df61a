"""Spawning gloo process groups on 127.0.0.1 for the distributed tests (a free port from binding port 0)."""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

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
