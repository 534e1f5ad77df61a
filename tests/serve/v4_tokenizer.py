"""A tokenizer.json in the released DeepSeek-V4 layout, built with the ``tokenizers`` library for the tests
(no released file is vendored).

The tokenizer is a byte-level BPE laid out like the released file: ids 0 / 1 / 2 are BOS / EOS / pad,
then the byte alphabet, then filler tokens up to id 127999, then 1,280 added tokens (128000-129279) in
which V4's control tokens sit at their released ids (``<｜User｜>`` 128803, ``<｜Assistant｜>`` 128804,
``<think>`` 128821, ``</think>`` 128822, ``｜DSML｜`` 128825, ...; the V4.1 layout adds ``<｜System｜>``
128799) and the rest are placeholders. It has no merges, so text is one token per byte and ids are easy
to write down: byte b -> b + 3, as the presets' byte tokenizer. Fillers are letter strings that no text
can produce (no merges), so random ids decode to letters.
"""
from __future__ import annotations

import itertools
import string

BYTE_OFFSET = 3
V4_IDS = {
    "<｜begin▁of▁sentence｜>": 0, "<｜end▁of▁sentence｜>": 1, "<｜▁pad▁｜>": 2,
    "<｜fim▁hole｜>": 128800, "<｜fim▁begin｜>": 128801, "<｜fim▁end｜>": 128802, "<｜User｜>": 128803,
    "<｜Assistant｜>": 128804, "<|EOT|>": 128805, "<think>": 128821, "</think>": 128822, "｜DSML｜": 128825,
    "<｜latest_reminder｜>": 128828, "<｜action｜>": 128829, "<｜query｜>": 128830, "<｜authority｜>": 128831,
    "<｜domain｜>": 128832, "<｜title｜>": 128836, "<｜read_url｜>": 128845,
}
"""Control tokens of the released V4 tokenizer.json and their ids (BOS / EOS / pad are 'special')."""
V41_IDS = {**V4_IDS, "<｜System｜>": 128799}
VOCAB = 129280
_SPECIAL = {"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"}


def _byte_chars() -> list[str]:
    """The byte-level alphabet in byte order (GPT-2's map: printable bytes stand for themselves)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def build_tokenizer_json(path: str, ids: dict[str, int] = V4_IDS, size: int = VOCAB) -> str:
    """Write a V4-layout tokenizer.json of ``size`` ids to ``path`` (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    base = 128000
    vocab = {t: i for t, i in ids.items() if i < BYTE_OFFSET}
    vocab.update({c: b + BYTE_OFFSET for b, c in enumerate(_byte_chars())})
    letters = ("".join(p) for n in (3, 4) for p in itertools.product(string.ascii_lowercase, repeat=n))
    vocab.update({w: i for i, w in zip(range(len(vocab), base), letters)})
    assert len(vocab) == base
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in vocab if t in _SPECIAL])
    by_id = {i: t for t, i in ids.items()}
    for i in range(base, size):
        text = by_id.get(i, f"<｜place▁holder▁no▁{i - base}｜>")
        token = AddedToken(text, normalized=False, special=text not in by_id)
        (tok.add_tokens if text in by_id else tok.add_special_tokens)([token])
    got = {t: tok.token_to_id(t) for t in ids}
    assert got == ids and tok.get_vocab_size(with_added_tokens=True) == size, got
    tok.save(path)
    return path
