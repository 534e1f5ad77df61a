"""The deterministic tables of V4.1's Engram n-gram hash, as the official ``inference/engram.py`` builds them.

Shared by every backend's tests and by the model: ``engram_hash`` takes these tensors as its inputs.

* **Multipliers** (``compute_hash_multipliers``): per Engram layer ``l``, ``max_ngram_size`` odd int64 values
  ``2 u + 1`` with ``u = numpy.random.default_rng(10007 * l).integers(0, bound, size=max_ngram_size)`` and
  ``bound = max(1, (int64_max // compressed_vocab_size) // 2)``, so that ``id * multiplier`` stays below
  2^63 for every compressed id.
* **Primes** (``EngramLayout.from_args``): one modulus per (layer, n-gram size, head), each the smallest prime
  above ``engram_vocab_size - 1`` that no earlier (layer, n, head) took, assigned in the order layer -> n ->
  head; the search restarts at ``engram_vocab_size - 1`` for every (layer, n), which gives the same sequence
  since the primes taken are all smaller than the next free one.
* **Offsets** (``NgramHashState.__init__``): per layer, the running sum of that layer's primes flattened in
  (n, head) order, starting at 0; a layer's table has ``sum(primes)`` rows (V4.1-Flash: 384,006,168 and
  384,016,682).
* **Windows** (``NgramHashState.forward``): position p looks back at the compressed ids of p, p-1, ...,
  p-(N-1); a slot before the sequence start, or holding an image-span token, is DEAD (-1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = ["INT64_MAX", "DEAD", "MULTIPLIER_SEED", "is_prime", "hash_multipliers", "hash_primes", "hash_offsets",
           "EngramTables", "engram_tables", "ngram_windows"]

INT64_MAX = 2**63 - 1
DEAD = -1
"""The window value of a slot that takes no part in an n-gram (before the sequence, or an image token)."""
MULTIPLIER_SEED = 10007
"""The multipliers of Engram layer ``l`` come from ``numpy.random.default_rng(MULTIPLIER_SEED * l)``."""
_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)   # deterministic Miller-Rabin below 3.3e24


def is_prime(n: int) -> bool:
    """Whether ``n`` is prime (deterministic Miller-Rabin, exact for every n < 3.3 * 10^24)."""
    if n < 2:
        return False
    for p in _WITNESSES:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in _WITNESSES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def hash_multipliers(layer_id: int, max_ngram_size: int, compressed_vocab_size: int) -> np.ndarray:
    """int64 [max_ngram_size]: the odd multipliers of Engram layer ``layer_id`` (see the module docstring)."""
    bound = max(1, (INT64_MAX // compressed_vocab_size) // 2)
    u = np.random.default_rng(MULTIPLIER_SEED * layer_id).integers(0, bound, size=(max_ngram_size,), dtype=np.int64)
    return u * 2 + 1


def hash_primes(n_layers: int, max_ngram_size: int, n_heads: int, engram_vocab_size: int) -> np.ndarray:
    """int64 [n_layers, max_ngram_size - 1, n_heads]: distinct primes, each the smallest one above
    ``engram_vocab_size - 1`` not yet taken, in the order layer -> n-gram size -> head."""
    taken: set[int] = set()
    out = np.empty((n_layers, max_ngram_size - 1, n_heads), np.int64)
    for layer in range(n_layers):
        for n in range(max_ngram_size - 1):
            cand = engram_vocab_size - 1
            for head in range(n_heads):
                cand += 1
                while cand in taken or not is_prime(cand):
                    cand += 1
                taken.add(cand)
                out[layer, n, head] = cand
    return out


def hash_offsets(layer_primes: np.ndarray) -> np.ndarray:
    """int64 [(N-1) * H]: where each (n, head) bucket range starts in its layer's table (exclusive running
    sum of ``layer_primes [N-1, H]`` flattened n-major)."""
    flat = np.asarray(layer_primes, np.int64).reshape(-1)
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(flat)[:-1]]).astype(np.int64)


@dataclass(frozen=True)
class EngramTables:
    """The hash inputs of one Engram layer, as ``engram_hash`` takes them (CPU int64 tensors)."""

    layer_id: int
    multipliers: torch.Tensor  # [N]
    primes: torch.Tensor       # [N-1, H]
    offsets: torch.Tensor      # [(N-1) * H]
    rows: int                  # table rows: sum of the primes

    def to(self, device: torch.device | str) -> "EngramTables":
        return EngramTables(self.layer_id, self.multipliers.to(device), self.primes.to(device),
                            self.offsets.to(device), self.rows)


def engram_tables(layer_ids: Sequence[int], max_ngram_size: int, n_heads: int, engram_vocab_size: int,
                  compressed_vocab_size: int) -> list[EngramTables]:
    """The tables of every Engram layer (config ``engram_layer_ids``, ``engram_max_ngram_size``,
    ``engram_n_heads``, ``engram_vocab_size``, ``engram_compressed_vocab_size``), in ``layer_ids`` order."""
    if max_ngram_size < 2:
        raise ValueError(f"engram_tables: max_ngram_size must be >= 2 (bigrams and up), got {max_ngram_size}")
    primes = hash_primes(len(layer_ids), max_ngram_size, n_heads, engram_vocab_size)
    out = []
    for i, layer in enumerate(layer_ids):
        mult = hash_multipliers(layer, max_ngram_size, compressed_vocab_size)
        out.append(EngramTables(int(layer), torch.from_numpy(mult), torch.from_numpy(primes[i].copy()),
                                torch.from_numpy(hash_offsets(primes[i])), int(primes[i].sum())))
    return out


def ngram_windows(history: torch.Tensor, start: int, length: int, max_ngram_size: int) -> torch.Tensor:
    """int64 [B, length, max_ngram_size]: ``window[b, i, k] = history[b, start + i - k]`` (compressed ids,
    -1 for image-span tokens), -1 where ``start + i - k < 0``: the ``window`` of ``engram_hash`` for the
    positions ``start .. start + length - 1`` from the per-sequence id cache ``history [B, >= start+length]``."""
    pos = torch.arange(start, start + length, device=history.device)[:, None] - \
        torch.arange(max_ngram_size, device=history.device)[None, :]
    gathered = history[:, pos.clamp(min=0)]
    return torch.where(pos[None] >= 0, gathered, torch.full_like(gathered, DEAD))
