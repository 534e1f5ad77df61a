"""The serving engine: continuous batching over a KV pool on one background thread.

Requests are submitted from any thread (the asyncio side) into a bounded FIFO; at the start of every step
the engine admits waiting requests while KV slots are free, then runs ONE ``forward_ragged`` over every
running sequence: a decode token for each that has finished its prompt, and prefill chunks (at most
``prefill_chunk`` prompt tokens per step in all) for those still prefilling. A sequence whose prompt is
complete samples its next token from that step's logits. It leaves, freeing its slot, at ``max_tokens``,
EOS, a stop string, or when cancelled (seen at the next step). An exception inside the model call fails
the requests of that step (an ``error`` event with status 500, slots freed); one raised by a sequence's
sampling or detokenisation fails that sequence alone; the loop carries on.

Every model call happens on the engine thread, inside ``torch.inference_mode``, the backend choice, the
batch-invariant setting (:mod:`dsv4rt.invariant`: on by default, so a request's greedy output does not
depend on what else runs) and, on the CPU, one torch thread (see ``runner._cpu_threads``). Results go
back through each request's ``sink`` callable, called on the engine thread with :class:`Event` objects;
``submit_async`` makes a sink that hands them to an ``asyncio.Queue`` with ``loop.call_soon_threadsafe``.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from .metrics import Counters
from .protocol import ApiError
from .sampling import SamplingParams, TextStream, make_generator, sample_rows

__all__ = ["Event", "Sequence", "Handle", "Engine"]

log = logging.getLogger("dsv4rt.serve")


@dataclass
class Event:
    """What the engine reports of a request: ``token`` (new ``text``; ``sampled``: the token and, when the
    request asks for logprobs, its :class:`~.logits.Sampled` log-probabilities, one event per token then),
    ``done`` (``finish_reason`` "stop" / "length", ``usage``) or ``error`` (``status``, ``message``)."""

    kind: str
    text: str = ""
    sampled: Any = None
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    status: int = 500
    message: str = ""


@dataclass(eq=False)
class Sequence:
    """Engine-side state of one request."""

    id: int
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    text: TextStream
    generator: torch.Generator | None = None
    slot: int | None = None
    cache: Any = None
    fed: int = 0                    # prompt tokens already in the cache
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False

    def usage(self) -> dict[str, int]:
        """OpenAI usage counts."""
        n, m = len(self.prompt), len(self.generated)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


class Handle:
    """The asyncio side of a submitted request: ``await next()`` gives its events in order."""

    def __init__(self, engine: "Engine", seq: Sequence, queue: "asyncio.Queue[Event]") -> None:
        self.engine, self.seq, self.queue = engine, seq, queue

    async def next(self, timeout: float | None = None) -> Event:
        """The next event (``asyncio.TimeoutError`` after ``timeout`` seconds)."""
        return await asyncio.wait_for(self.queue.get(), timeout)

    def cancel(self) -> None:
        """Cancel the request (no-op once it finished); its slot is freed at the next step."""
        self.engine.cancel(self.seq)


class Engine:
    """``Engine(model, tokenizer, pool)``; ``start()`` runs the loop thread, ``stop()`` ends it.
    ``backend``: a ``use_backend`` choice held around the model calls (None: automatic);
    ``batch_invariant``: :func:`dsv4rt.invariant.mode` around them (None: DSV4RT_BATCH_INVARIANT)."""

    def __init__(self, model: Any, tokenizer: Any, pool: Any, max_queue: int = 256, prefill_chunk: int = 512,
                 backend: str | None = None, batch_invariant: bool | None = None) -> None:
        if max_queue < 0 or prefill_chunk < 1:
            raise ValueError(f"Engine: max_queue {max_queue} must be >= 0 and prefill_chunk {prefill_chunk} >= 1")
        self.model, self.tokenizer, self.pool = model, tokenizer, pool
        self.max_queue, self.prefill_chunk, self.backend = max_queue, prefill_chunk, backend
        self.batch_invariant = batch_invariant
        self.counters = Counters()
        self.steps = 0
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- any thread ------------------------------------------------------------------------------

    def batch_invariant_on(self) -> bool:
        """Whether the engine's model calls run in the batch-invariant mode (the CPU only)."""
        from .. import invariant

        with invariant.mode(self.batch_invariant):
            return invariant.enabled() and self.model.device.type == "cpu"

    @property
    def alive(self) -> bool:
        """True while the loop thread runs."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> "Engine":
        """Start the loop thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dsv4rt-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """End the loop after its current step; requests still queued or running get a 503 error."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            left = list(self._waiting) + self._running
            self._waiting.clear()
        for s in left:
            self._fail(s, 503, "the server is shutting down")

    def submit(self, prompt: list[int], params: SamplingParams, sink: Callable[[Event], None],
               param: str = "prompt") -> Sequence:
        """Queue a request; raises :class:`ApiError` 400 when prompt + max_tokens exceed a slot
        (``param`` names the prompt's field), 503 when the queue is full or the engine stopped.
        ``max_tokens`` None: up to the slot's length (at least one token)."""
        cap = self.pool.max_seq_len
        if not prompt:
            raise ApiError(400, "the prompt is empty", param)
        if params.max_tokens is None:
            params = replace(params, max_tokens=max(cap - len(prompt), 1))
        if len(prompt) + params.max_tokens > cap:
            self.counters.request("rejected")
            raise ApiError(400, f"This model's maximum context length is {cap} tokens; this request asks for "
                           f"{len(prompt) + params.max_tokens} ({len(prompt)} in the prompt, {params.max_tokens} "
                           f"for the completion). Shorten the prompt or lower max_tokens.", param)
        seq = Sequence(next(self._ids), list(prompt), params, sink, TextStream(self.tokenizer, params.stop,
                                                                            params.skip_special_tokens),
                       make_generator(params, self.model.device))
        with self._cv:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", None, "server_error")
            if len(self._waiting) >= self.max_queue:
                self.counters.request("rejected")
                raise ApiError(503, f"the server is overloaded: {len(self._waiting)} requests are waiting for a "
                               f"KV slot (--max-queue {self.max_queue}); retry later", None, "server_error",
                               headers={"Retry-After": "1"})
            self._waiting.append(seq)
            self._cv.notify_all()
        return seq

    def submit_async(self, prompt: list[int], params: SamplingParams, param: str = "prompt") -> Handle:
        """``submit`` from a coroutine: the events arrive on the handle's asyncio queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(ev: Event) -> None:
            with contextlib.suppress(RuntimeError):   # the loop closed: nobody listens any more
                loop.call_soon_threadsafe(queue.put_nowait, ev)

        return Handle(self, self.submit(prompt, params, sink, param), queue)

    def cancel(self, seq: Sequence) -> None:
        """Mark ``seq`` cancelled; the engine drops it at its next step."""
        with self._cv:
            seq.cancelled = True
            self._cv.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """Counters and gauges (the fields ``metrics.render`` reads)."""
        with self._cv:
            running, waiting = len(self._running), len(self._waiting)
        snap = self.counters.snapshot()
        snap.update(requests_running=running, requests_waiting=waiting, kv_slots_used=self.pool.used,
                    kv_slots_total=self.pool.n_slots, kv_cache_bytes=self.pool.n_slots * self.pool.slot_bytes,
                    tokens_per_s=self.counters.tokens_per_s(), steps=self.steps, alive=self.alive)
        return snap

    # ---- the engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        from .. import invariant
        from ..model.runner import _cpu_threads, _use

        use = contextlib.nullcontext() if self.backend is None else _use(self.backend)
        with torch.inference_mode(), _cpu_threads(self.model.device), use, invariant.mode(self.batch_invariant):
            while True:
                with self._cv:
                    while not self._stopping and not self._waiting and not self._running:
                        self._cv.wait()
                    if self._stopping:
                        return
                try:
                    self._admit()
                    batch = self._batch()
                    if batch:
                        self._step(batch)
                    del batch            # an idle loop must not hold the last step's requests
                except Exception:  # a bug outside the step's own guard: keep serving
                    log.exception("dsv4rt serve: engine step failed")

    def _admit(self) -> None:
        with self._cv:
            for s in [s for s in self._running if s.cancelled]:
                self._leave(s, "cancelled")
            kept = deque(s for s in self._waiting if not s.cancelled)
            for _ in range(len(self._waiting) - len(kept)):
                self.counters.request("cancelled")
            self._waiting = kept
            while self._waiting and self.pool.used < self.pool.n_slots:
                got = self.pool.alloc()
                if got is None:
                    break
                s = self._waiting.popleft()
                s.slot, s.cache = got
                self._running.append(s)

    def _batch(self) -> list[tuple[Sequence, list[int]]]:
        batch, budget = [], self.prefill_chunk
        for s in self._running:
            if s.fed < len(s.prompt):
                n = min(budget, len(s.prompt) - s.fed)
                if n > 0:
                    batch.append((s, s.prompt[s.fed:s.fed + n]))
                    budget -= n
            else:
                batch.append((s, s.generated[-1:]))
        return batch

    def _step(self, batch: list[tuple[Sequence, list[int]]]) -> None:
        dev = self.model.device
        try:
            tokens = [torch.tensor(t, dtype=torch.long, device=dev) for _, t in batch]
            logits = self.model.forward_ragged(tokens, [s.cache for s, _ in batch])
        except Exception as exc:
            log.exception("dsv4rt serve: step %d failed for %d requests", self.steps, len(batch))
            for s, _ in batch:
                self._fail(s, 500, f"the engine failed on this request: {type(exc).__name__}: {exc}")
            return
        finally:
            self.steps += 1
        prefilled = 0
        for s, t in batch:
            if s.fed < len(s.prompt):
                s.fed += len(t)
                prefilled += len(t)
        rows = [i for i, (s, _) in enumerate(batch) if s.fed >= len(s.prompt)]
        seqs = [batch[i][0] for i in rows]
        try:                                 # sample_rows isolates its rows; this guards its set-up
            got = sample_rows(logits[rows], [s.params for s in seqs], [s.generator for s in seqs],
                              [s.prompt for s in seqs], [s.generated for s in seqs]) if rows else []
        except Exception as exc:
            got = [exc] * len(seqs)
        self.counters.tokens(prompt=prefilled, generated=sum(not isinstance(g, Exception) for g in got))
        for s, g in zip(seqs, got):
            try:
                if isinstance(g, Exception):
                    raise g
                self._token(s, g)
            except Exception as exc:
                log.exception("dsv4rt serve: request %d failed in sampling or detokenisation", s.id)
                self._fail(s, 500, f"the engine failed on this request: {type(exc).__name__}: {exc}")

    def _token(self, s: Sequence, sampled: Any) -> None:
        tid = sampled.token
        s.generated.append(tid)
        reason = None
        if tid == self.tokenizer.eos_id and not s.params.ignore_eos:
            delta, reason = s.text.flush(), "stop"
        else:
            delta, hit = s.text.push(tid)
            if hit:
                reason = "stop"
            elif len(s.generated) >= s.params.max_tokens:
                delta, reason = delta + s.text.flush(), "length"
        if delta or s.params.logprobs is not None:
            self._send(s, Event("token", text=delta, sampled=sampled))
        if reason is not None:
            self._send(s, Event("done", finish_reason=reason, usage=s.usage()))
            with self._cv:
                self._leave(s, "ok")

    def _leave(self, s: Sequence, status: str) -> None:
        """Free ``s``'s slot and drop it from the running list (caller holds the lock)."""
        if s.slot is not None:
            self.pool.free(s.slot)
            s.slot = s.cache = None
        if s in self._running:
            self._running.remove(s)
        if not s.finished:
            s.finished = True
            self.counters.request(status)

    def _fail(self, s: Sequence, status: int, message: str) -> None:
        if s.finished:
            return
        self._send(s, Event("error", status=status, message=message))
        with self._cv:
            self._leave(s, "error")

    def _send(self, s: Sequence, ev: Event) -> None:
        try:
            s.sink(ev)
        except Exception:  # a broken sink must not stop the engine
            log.exception("dsv4rt serve: delivering an event of request %d failed", s.id)
