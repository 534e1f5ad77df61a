"""Tokenizers: a ``tokenizer.json`` through the optional ``tokenizers`` package (the checkpoint's, or the
file / folder of ``--tokenizer``), or the byte-level tokenizer of the synthetic presets (bos 0, eos 1,
pad 2, byte b -> b + 3).

``decode(ids, skip_special_tokens=True)`` drops every control token: the ``special`` ones and also the
other added tokens of ``tokenizer.json`` (DeepSeek marks ``<｜User｜>``, ``<think>`` and ``｜DSML｜``
non-special, but they are markup, not text); ``skip_special_tokens=False`` keeps them all as text (the
chat parser reads ``<think>`` and DSML from it). :func:`load_tokenizer` refuses a tokenizer whose ids do not
fit the model's vocabulary, so no id can index past the embedding.
"""
from __future__ import annotations

import os
from typing import Protocol

from ..errors import CheckpointError
from .config import ModelConfig

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "tokenizer_file", "BYTE_OFFSET"]

BYTE_OFFSET = 3


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def token_id(self, token: str) -> int | None: ...

    @property
    def max_id(self) -> int: ...


class ByteTokenizer:
    """UTF-8 bytes shifted by 3; ``encode`` prepends bos; ids that are not bytes decode to nothing; no
    text is a single control token (``token_id`` is always None)."""

    def __init__(self, bos_id: int = 0, eos_id: int = 1) -> None:
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + [b + BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < 256 + BYTE_OFFSET)
        return data.decode("utf-8", errors="replace")

    def token_id(self, token: str) -> int | None:
        return None

    @property
    def max_id(self) -> int:
        """The largest id ``encode`` can give."""
        return max(255 + BYTE_OFFSET, self.bos_id, self.eos_id)


class HFTokenizer:
    """A ``tokenizer.json`` read by the ``tokenizers`` package (imported only here)."""

    def __init__(self, path: str, bos_id: int, eos_id: int) -> None:
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise CheckpointError(f"{path}: reading tokenizer.json needs the 'tokenizers' package, which is not "
                                  f"installed (pip install tokenizers, or pip install 'dsv4rt[model]')") from None
        try:
            self._tok = _Tok.from_file(path)
        except Exception as exc:  # tokenizers raises its own exception type
            raise CheckpointError(f"{path}: not a readable tokenizer.json ({exc})") from None
        self.path, self.bos_id, self.eos_id = path, bos_id, eos_id
        self._added = frozenset(self._tok.get_added_tokens_decoder())
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._max_id = max(vocab.values(), default=-1)
        self.size = len(vocab)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + list(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = [i for i in ids if i not in self._added] if skip_special_tokens else list(ids)
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        """The id of ``token`` when it is one token of the vocabulary (added tokens included), else None."""
        return self._tok.token_to_id(token)

    @property
    def max_id(self) -> int:
        """The largest id of the vocabulary (added tokens included)."""
        return self._max_id


def tokenizer_file(path: str) -> str:
    """``path`` when it is a file, ``path/tokenizer.json`` when it is a folder holding one; else
    CheckpointError naming what was looked for."""
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        inner = os.path.join(path, "tokenizer.json")
        if os.path.isfile(inner):
            return inner
        raise CheckpointError(f"--tokenizer {path}: the folder has no tokenizer.json")
    raise CheckpointError(f"--tokenizer {path}: no such file or folder (expected a tokenizer.json, or a folder "
                          f"holding one)")


def _check(tok: HFTokenizer, cfg: ModelConfig) -> HFTokenizer:
    """``tok`` when its ids fit the model: every id below ``vocab_size``, and bos / eos ids it holds."""
    if tok.max_id >= cfg.vocab_size:
        raise CheckpointError(f"{tok.path}: the tokenizer has ids up to {tok.max_id} ({tok.size} tokens), but the "
                              f"model's vocabulary has {cfg.vocab_size} ids (vocab_size of its config): this "
                              f"tokenizer belongs to another model; pass the model's own with --tokenizer PATH")
    for what, i in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id)):
        if tok._tok.id_to_token(i) is None:
            raise CheckpointError(f"{tok.path}: the model's {what} {i} is no token of this tokenizer "
                                  f"(ids 0..{tok.max_id}, {tok.size} tokens)")
    return tok


def load_tokenizer(cfg: ModelConfig, checkpoint_dir: str | None = None, path: str | None = None) -> Tokenizer:
    """``path`` (``--tokenizer``: a tokenizer.json or a folder holding one) when given, else the checkpoint's
    ``tokenizer.json`` when present, else the byte tokenizer for the synthetic presets. A tokenizer.json is
    checked against ``cfg`` (CheckpointError naming both sizes when its ids exceed ``vocab_size``)."""
    if path is not None:
        return _check(HFTokenizer(tokenizer_file(path), cfg.bos_token_id, cfg.eos_token_id), cfg)
    if checkpoint_dir is not None:
        file = os.path.join(checkpoint_dir, "tokenizer.json")
        if os.path.isfile(file):
            return _check(HFTokenizer(file, cfg.bos_token_id, cfg.eos_token_id), cfg)
    if cfg.extra.get("tokenizer") == "bytes":
        return ByteTokenizer(cfg.bos_token_id, cfg.eos_token_id)
    raise CheckpointError(f"{checkpoint_dir}: no tokenizer.json (and the config does not ask for the byte tokenizer); "
                          f"pass one with --tokenizer PATH")
