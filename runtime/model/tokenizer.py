"""Tokenizers: the checkpoint's ``tokenizer.json`` through the optional ``tokenizers`` package, or the
byte-level tokenizer of the synthetic presets (bos 0, eos 1, pad 2, byte b -> b + 3)."""
from __future__ import annotations

import os
from typing import Protocol

from ..errors import CheckpointError
from .config import ModelConfig

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "BYTE_OFFSET"]

BYTE_OFFSET = 3


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted by 3; ``encode`` prepends bos; ids that are not bytes decode to nothing."""

    def __init__(self, bos_id: int = 0, eos_id: int = 1) -> None:
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + [b + BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < 256 + BYTE_OFFSET)
        return data.decode("utf-8", errors="replace")


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
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + list(ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(cfg: ModelConfig, checkpoint_dir: str | None = None) -> Tokenizer:
    """``tokenizer.json`` of the checkpoint when present; the byte tokenizer for the synthetic presets."""
    if checkpoint_dir is not None:
        path = os.path.join(checkpoint_dir, "tokenizer.json")
        if os.path.isfile(path):
            return HFTokenizer(path, cfg.bos_token_id, cfg.eos_token_id)
    if cfg.extra.get("tokenizer") == "bytes":
        return ByteTokenizer(cfg.bos_token_id, cfg.eos_token_id)
    raise CheckpointError(f"{checkpoint_dir}: no tokenizer.json (and the config does not ask for the byte tokenizer)")
