"""Server counters and their Prometheus text exposition (format 0.0.4, ``# HELP`` / ``# TYPE`` lines).

Counters: ``dsv4rt_requests_total{status}`` (ok: finished by EOS / stop string / length; cancelled: the
client went away; error: failed inside the engine; rejected: refused at admission, queue full or context
too long; invalid: refused by request validation), ``dsv4rt_prompt_tokens_total`` (prompt tokens
prefilled), ``dsv4rt_generation_tokens_total``. Gauges: running and waiting requests, KV slots used and in
total, the KV pool's bytes, and generated tokens per second over the last 10 s.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

__all__ = ["Counters", "render", "STATUSES", "RATE_WINDOW_S"]

STATUSES = ("ok", "cancelled", "error", "rejected", "invalid")
RATE_WINDOW_S = 10.0


class Counters:
    """Thread-safe request and token counters (the engine thread and the HTTP side both write)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = {s: 0 for s in STATUSES}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self._recent: deque[tuple[float, int]] = deque()

    def request(self, status: str) -> None:
        """Count one finished or refused request under ``status``."""
        with self._lock:
            self.requests[status] = self.requests.get(status, 0) + 1

    def tokens(self, prompt: int = 0, generated: int = 0, now: float | None = None) -> None:
        """Add prompt tokens prefilled and tokens generated in one step."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated
            if generated:
                self._recent.append((now, generated))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_s(self, now: float | None = None) -> float:
        """Generated tokens per second over the last ``RATE_WINDOW_S`` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain values."""
        with self._lock:
            return {"requests": dict(self.requests), "prompt_tokens": self.prompt_tokens,
                    "generation_tokens": self.generation_tokens}


_GAUGES = (
    ("requests_running", "Requests holding a KV slot (prefilling or decoding)."),
    ("requests_waiting", "Requests queued for a KV slot."),
    ("kv_slots_used", "KV pool slots in use."),
    ("kv_slots_total", "KV pool slots."),
    ("kv_cache_bytes", "Bytes of the KV pool."),
    ("generation_tokens_per_second", "Generated tokens per second over the last 10 s."),
)


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(stats: dict[str, Any], model_name: str) -> str:
    """Prometheus text of an engine snapshot (see ``Engine.snapshot``); every series has a ``model`` label."""
    m = f'model="{_label(model_name)}"'
    lines = ["# HELP dsv4rt_requests_total Requests by outcome.", "# TYPE dsv4rt_requests_total counter"]
    for status, n in stats["requests"].items():
        lines.append(f'dsv4rt_requests_total{{{m},status="{_label(status)}"}} {n}')
    for name, key, help_ in (("prompt_tokens_total", "prompt_tokens", "Prompt tokens prefilled."),
                             ("generation_tokens_total", "generation_tokens", "Tokens generated.")):
        lines += [f"# HELP dsv4rt_{name} {help_}", f"# TYPE dsv4rt_{name} counter",
                  f"dsv4rt_{name}{{{m}}} {stats[key]}"]
    for name, help_ in _GAUGES:
        v = stats[name.replace("generation_tokens_per_second", "tokens_per_s")]
        lines += [f"# HELP dsv4rt_{name} {help_}", f"# TYPE dsv4rt_{name} gauge",
                  f"dsv4rt_{name}{{{m}}} {float(v):.6g}" if isinstance(v, float) else f"dsv4rt_{name}{{{m}}} {v}"]
    return "\n".join(lines) + "\n"
