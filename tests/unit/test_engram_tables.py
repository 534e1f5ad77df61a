"""dsv4rt.engram_tables against values derived independently: primality by trial division, the "next unused
prime" order by a sieve of the whole range, the table sizes of the released V4.1-Flash config, the
multipliers' bound, and the hash windows against a per-position loop over a cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dsv4rt import ops
from dsv4rt.engram_tables import (DEAD, INT64_MAX, engram_tables, hash_multipliers, hash_offsets, hash_primes,
                                  is_prime, ngram_windows)

# text_config of V4.1-Flash (spec/deepseek-v41.md section 3.1)
LAYERS, MAX_NGRAM, HEADS, VOCAB, COMPRESSED = (1, 14), 4, 8, 16_000_000, 99_092
NUM_EMBEDDINGS = (384_006_168, 384_016_682)


def _trial_division(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))


def _sieve_primes(lo: int, hi: int) -> list[int]:
    """Primes in [lo, hi] by a segmented sieve (independent of is_prime)."""
    small = [p for p in range(2, int(hi**0.5) + 1) if _trial_division(p)]
    mark = np.ones(hi - lo + 1, bool)
    for p in small:
        start = max(p * p, -(-lo // p) * p)
        mark[start - lo::p] = False
    return [lo + i for i in np.flatnonzero(mark) if lo + i >= 2]


def test_is_prime_matches_trial_division():
    for n in list(range(-3, 2000)) + list(range(15_999_900, 16_000_600)):
        assert is_prime(n) == _trial_division(n), n
    assert is_prime(2**61 - 1) and not is_prime(2**61 + 1) and not is_prime(3215031751)   # a strong pseudoprime


def test_primes_are_the_next_unused_primes_in_layer_n_head_order():
    primes = hash_primes(len(LAYERS), MAX_NGRAM, HEADS, VOCAB)
    assert primes.shape == (2, 3, 8)
    flat = primes.reshape(-1).tolist()
    assert flat == _sieve_primes(VOCAB, flat[-1])    # every prime from the vocab size on, none skipped, in order
    assert all(_trial_division(p) for p in flat[:4])
    assert flat[0] > VOCAB - 1


def test_table_rows_and_offsets_match_the_released_config():
    tables = engram_tables(LAYERS, MAX_NGRAM, HEADS, VOCAB, COMPRESSED)
    assert tuple(t.rows for t in tables) == NUM_EMBEDDINGS
    for t in tables:
        p = t.primes.reshape(-1).tolist()
        assert t.offsets.tolist() == [sum(p[:i]) for i in range(len(p))]
        assert int(t.offsets[-1]) + p[-1] == t.rows
        assert t.multipliers.dtype == t.primes.dtype == t.offsets.dtype == torch.int64
    assert torch.equal(torch.from_numpy(hash_offsets(np.array([[5, 7], [11, 13]]))), torch.tensor([0, 5, 12, 23]))


@pytest.mark.parametrize("layer", LAYERS)
def test_multipliers_are_odd_bounded_and_from_the_layer_seed(layer):
    m = hash_multipliers(layer, MAX_NGRAM, COMPRESSED)
    bound = (INT64_MAX // COMPRESSED) // 2
    u = np.random.default_rng(10007 * layer).integers(low=0, high=bound, size=(MAX_NGRAM,), dtype=np.int64)
    assert m.dtype == np.int64 and (m % 2 == 1).all() and np.array_equal(m, 2 * u + 1)
    assert all(int(x) * (COMPRESSED - 1) <= INT64_MAX for x in m)      # no id of the compressed vocab overflows
    other = hash_multipliers(LAYERS[0] if layer != LAYERS[0] else LAYERS[1], MAX_NGRAM, COMPRESSED)
    assert not np.array_equal(m, other)


def test_ngram_windows_match_a_per_position_loop():
    g = torch.Generator().manual_seed(5)
    hist = torch.randint(0, 50, (2, 13), generator=g)
    hist[0, 4] = DEAD
    win = ngram_windows(hist, 3, 10, 4)
    for b in range(2):
        for i in range(10):
            for k in range(4):
                p = 3 + i - k
                assert int(win[b, i, k]) == (int(hist[b, p]) if p >= 0 else DEAD)


def _official_semantics(ids: list[int], image: list[bool], pad: int, mult: list[int], primes, offsets) -> list:
    """NgramHashState.forward as the spec states it, one position at a time in Python integers: look back
    from each position over the compressed ids, stopping at the sequence start or an image token."""
    out = []
    n, heads = len(mult), len(primes[0])
    for pos in range(len(ids)):
        blocked, h, row = False, 0, []
        for k in range(n):
            blocked = blocked or pos - k < 0 or image[pos - k]
            tok = pad if blocked else ids[pos - k]
            h = tok * mult[k] if k == 0 else h ^ (tok * mult[k])
            if k:
                row += [h % primes[k - 1][j] + offsets[(k - 1) * heads + j] for j in range(heads)]
        out.append(row)
    return out


@pytest.mark.parametrize("variant", ["cpu/native", "cpu/numpy", "cpu/torch"])
def test_prefill_then_decode_windows_hash_as_the_official_forward(variant):
    """A cache filled by a prefill chunk and then one token per decode step gives, through ngram_windows and
    engram_hash, exactly the rows of the per-position definition (released tables of layer 14)."""
    tab = engram_tables(LAYERS, MAX_NGRAM, HEADS, VOCAB, COMPRESSED)[1]
    g = torch.Generator().manual_seed(14)
    length, prefill = 40, 29
    ids = torch.randint(0, COMPRESSED, (length,), generator=g)
    image = torch.zeros(length, dtype=torch.bool)
    image[10:17] = True
    pad = 7
    cache = torch.where(image, DEAD, ids)[None, :]
    got = [ops.engram_hash(ngram_windows(cache, 0, prefill, MAX_NGRAM)[0], tab.multipliers, tab.primes, tab.offsets,
                           pad, backend=variant)]
    for pos in range(prefill, length):
        got.append(ops.engram_hash(ngram_windows(cache, pos, 1, MAX_NGRAM)[0], tab.multipliers, tab.primes,
                                   tab.offsets, pad, backend=variant))
    want = _official_semantics(ids.tolist(), image.tolist(), pad, tab.multipliers.tolist(), tab.primes.tolist(),
                               tab.offsets.tolist())
    assert torch.cat(got).tolist() == want
    assert int(torch.cat(got).max()) < tab.rows
