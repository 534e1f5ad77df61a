"""The Engram token-class map of DeepSeek-V4.1: every tokenizer id -> a compressed class id.

The official ``inference/engram.py`` (``build_compressed_token_map``) decodes each id on its own with the raw
``tokenizers`` decoder (``decode([id], skip_special_tokens=False)``, no clean-up of spaces) and keys it:

* a decoded text holding U+FFFD (a byte token that is only part of a UTF-8 character) is keyed by the
  token's own vocabulary string (``id_to_token``), unnormalised;
* any other text is normalised by NFKC, NFD, StripAccents, Lowercase, every run of ``[ \\t\\r\\n]`` -> one
  space, a text that is then exactly one space -> U+E000 (so it survives the strip), Strip, U+E000 -> space;
  the key is the normalised text, or the decoded text itself when normalising leaves nothing.

Classes are numbered in order of first appearance over ids 0, 1, ..., ``len(tokenizer) - 1`` (the size with
added tokens). The class count is V4.1's ``engram_compressed_vocab_size``: every hash multiplier derives from
it, so a tokenizer that gives another count would silently re-hash the whole table; :func:`check_class_count`
refuses that. The n-gram pad class is ``map[engram_pad_id]``.

:func:`write_byte_tokenizer_json` writes the byte-level tokenizer of the synthetic presets (bos 0, eos 1,
pad 2, byte b -> id b + 3, as :class:`dsv4rt.model.tokenizer.ByteTokenizer`) as a real ``tokenizer.json``.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["engram_normalizer", "engram_token_map", "check_class_count", "write_byte_tokenizer_json",
           "BYTE_SPECIALS"]

_SENTINEL = "\ue000"
_PARTIAL = "\ufffd"
BYTE_SPECIALS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>")
"""The byte tokenizer's ids 0 / 1 / 2 (bos / eos / pad), spelled as in the released DeepSeek tokenizer."""


def engram_normalizer() -> Any:
    """The ``tokenizers`` normaliser sequence of the official map (see the module docstring)."""
    from tokenizers import Regex, normalizers as n

    return n.Sequence([n.NFKC(), n.NFD(), n.StripAccents(), n.Lowercase(),
                       n.Replace(Regex(r"[ \t\r\n]+"), " "), n.Replace(Regex(r"^ $"), _SENTINEL),
                       n.Strip(), n.Replace(_SENTINEL, " ")])


def _load(tokenizer: Any) -> Any:
    """A ``tokenizers.Tokenizer`` from one, from an object carrying one as ``backend_tokenizer`` (a
    transformers fast tokenizer), or from the path of a tokenizer.json (or a folder holding one)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from tokenizers import Tokenizer

        path = os.fspath(tokenizer)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"engram_token_map: no tokenizer.json at {os.fspath(tokenizer)}")
        try:
            return Tokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises its own exception type
            raise CheckpointError(f"engram_token_map: {path} is not a readable tokenizer.json ({exc})") from None
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not (hasattr(backend, "decode") and hasattr(backend, "id_to_token") and hasattr(backend, "get_vocab_size")):
        raise CheckpointError(f"engram_token_map: expected a tokenizers.Tokenizer or a tokenizer.json path, "
                              f"got {type(tokenizer).__name__}")
    return backend


def engram_token_map(tokenizer: Any) -> tuple[torch.Tensor, int]:
    """int64 [vocab] class id of every token id, and the class count (see the module docstring).

    ``tokenizer``: a ``tokenizers.Tokenizer``, an object with ``backend_tokenizer``, or a tokenizer.json path."""
    tok = _load(tokenizer)
    norm = engram_normalizer()
    size = tok.get_vocab_size(with_added_tokens=True)
    classes: dict[str, int] = {}
    out = torch.empty(size, dtype=torch.int64)
    for i in range(size):
        text = tok.decode([i], skip_special_tokens=False)
        if _PARTIAL in text:
            key = tok.id_to_token(i)
        else:
            key = norm.normalize_str(text) or text
        out[i] = classes.setdefault(key, len(classes))
    return out, len(classes)


def check_class_count(count: int, expected: int, where: str = "config") -> None:
    """CheckpointError naming both counts when the tokenizer's class count is not the config's
    ``engram_compressed_vocab_size`` (the hash multipliers would differ from training)."""
    if count != expected:
        raise CheckpointError(f"{where}: engram_compressed_vocab_size is {expected}, but the tokenizer gives "
                              f"{count} Engram token classes: the Engram hash multipliers derive from this count, "
                              f"so the tokenizer does not belong to this model (expected {expected} classes)")


def _byte_chars() -> list[str]:
    """The byte-level alphabet (GPT-2's map) in byte order: printable bytes stand for themselves."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    spare = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(spare)) for b in range(256)]


def write_byte_tokenizer_json(path: str | os.PathLike) -> str:
    """Write the synthetic presets' byte tokenizer as a tokenizer.json: 259 ids, bos 0, eos 1, pad 2 (special
    tokens spelled as :data:`BYTE_SPECIALS`), byte b -> id b + 3; byte-level pre-tokenizer and decoder, no
    merges, so text encodes one token per UTF-8 byte. Returns the file's path (``path/tokenizer.json`` when
    ``path`` is a folder)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    vocab = {t: i for i, t in enumerate(BYTE_SPECIALS)}
    vocab.update({c: b + len(BYTE_SPECIALS) for b, c in enumerate(_byte_chars())})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in BYTE_SPECIALS])
    if tok.get_vocab_size(with_added_tokens=True) != 259:
        raise AssertionError(f"byte tokenizer: {tok.get_vocab_size(with_added_tokens=True)} ids, expected 259")
    tok.save(path)
    return path
