"""A plain-text progress line on stderr (no dependencies): redrawn in place on a terminal, printed at
every 10% otherwise (logs, CI)."""
from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "ProgressSource"]


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class Progress:
    """``Progress(label, total_bytes, total_items)``; call ``advance(nbytes)`` per item and ``close()``.
    Off a terminal, loads under ``quiet_below`` bytes print nothing. ``unit`` names the items; with
    ``count_only`` the line shows items (pass ``total_bytes = total_items`` and ``advance(1)``), no bytes."""

    def __init__(self, label: str, total_bytes: int, total_items: int, enabled: bool = True,
                 stream: TextIO | None = None, quiet_below: int = 256 << 20, unit: str = "tensors",
                 count_only: bool = False) -> None:
        self.label, self.total, self.items = label, max(total_bytes, 1), total_items
        self.unit, self.count_only = unit, count_only
        self.done = self.count = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled and (self.tty or total_bytes >= quiet_below)
        self.t0 = self._last = time.perf_counter()
        self._decile = -1

    def _line(self) -> str:
        frac = self.done / self.total
        bar = "#" * int(frac * 30)
        elapsed = time.perf_counter() - self.t0
        if self.count_only:
            return f"{self.label}: [{bar:<30}] {frac * 100:5.1f}%  {self.count}/{self.items} {self.unit}  {elapsed:.0f} s"
        rate = self.done / max(elapsed, 1e-9)
        return (f"{self.label}: [{bar:<30}] {frac * 100:5.1f}%  {self.count}/{self.items} {self.unit}  "
                f"{_gb(self.done)}/{_gb(self.total)}  {_gb(rate)}/s")

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        self.count += 1
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last > 0.1 or self.count == self.items:
                self.stream.write("\r" + self._line())
                self.stream.flush()
                self._last = now
            return
        decile = int(10 * self.done / self.total)
        if decile > self._decile:
            self._decile = decile
            self.stream.write(self._line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r" + self._line() + "\n")
            self.stream.flush()


_ITEMSIZE = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "BF16": 2, "F32": 4, "I64": 8, "I32": 4}


class ProgressSource:
    """Wraps a weight source (``get(name)``, ``schema``) and advances a ``Progress`` per tensor drawn, sized
    from the source's schema; every other attribute is the wrapped source's."""

    def __init__(self, source: Any, label: str, enabled: bool = True, stream: TextIO | None = None) -> None:
        self._source = source
        sizes = [math.prod(s.shape) * _ITEMSIZE.get(s.dtype, 4) for s in source.schema.values()]
        self.progress = Progress(label, sum(sizes), len(sizes), enabled=enabled, stream=stream, quiet_below=0)

    def get(self, name: str) -> Any:
        t = self._source.get(name)
        self.progress.advance(t.numel() * t.element_size())
        return t

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)
