"""Log-probabilities in OpenAI's response formats, from the engine's :class:`~.logits.Sampled` tokens.

A token's text is its own decoded piece (control tokens included); a piece that is not valid UTF-8 on its
own (a byte-level token holding part of a character) is written ``bytes:\\xe2\\x80`` as OpenAI does, and
``bytes`` always gives the raw bytes. Log-probabilities below -9999 (``-inf`` where the model gives a
token no mass) are written -9999.0, as vLLM does, since JSON has no infinity.

* chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
  "refusal": null}`` with ``top_logprobs`` the k most likely tokens, most likely first;
* completions: ``{"tokens", "token_logprobs", "top_logprobs": [{text: logprob}], "text_offset"}`` where
  each ``top_logprobs`` entry holds the k most likely tokens and the chosen one, and ``text_offset`` is the
  offset of each token's text, the sum of the lengths of the token texts before it (as vLLM counts).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from .logits import Sampled

__all__ = ["TokenText", "chat_logprobs", "completion_logprobs", "FLOOR"]

FLOOR = -9999.0


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in of each byte (GPT-2's table), inverted: char -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return {(chr(b) if b in keep else chr(next(extra))): b for b in range(256)}


_BYTES = _byte_alphabet()
_HEX = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _has_byte_level(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_has_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_byte_level(v) for v in node)
    return False


class TokenText:
    """The text and raw bytes of single token ids of ``tokenizer`` (a ``ByteTokenizer``, an
    ``HFTokenizer`` or anything with ``decode``)."""

    def __init__(self, tokenizer: Any) -> None:
        from ..model.tokenizer import BYTE_OFFSET, ByteTokenizer

        self.tok = tokenizer
        self._byte_offset = BYTE_OFFSET if isinstance(tokenizer, ByteTokenizer) else None
        inner = getattr(tokenizer, "_tok", None)         # HFTokenizer's tokenizers.Tokenizer
        self._inner = inner if hasattr(inner, "id_to_token") else None
        self._added = getattr(tokenizer, "_added", frozenset())
        self._byte_level = False
        if self._inner is not None:
            try:
                self._byte_level = _has_byte_level(json.loads(self._inner.to_str()).get("decoder"))
            except (ValueError, AttributeError):
                self._byte_level = False

    def bytes(self, token: int) -> bytes:
        """The raw bytes of ``token`` (control tokens: their text)."""
        if self._byte_offset is not None:
            b = token - self._byte_offset
            return bytes([b]) if 0 <= b < 256 else b""
        if self._inner is not None:
            piece = self._inner.id_to_token(token)
            if piece is not None and token not in self._added:
                if self._byte_level and all(c in _BYTES for c in piece):
                    return bytes(_BYTES[c] for c in piece)
                m = _HEX.fullmatch(piece)
                if m:
                    return bytes([int(m.group(1), 16)])
        return self.tok.decode([token], skip_special_tokens=False).encode("utf-8")

    def text(self, token: int) -> str:
        """The text of ``token``, or ``bytes:\\xNN...`` when its bytes are not UTF-8 on their own."""
        if self._byte_offset is None and self._inner is None:
            return self.tok.decode([token], skip_special_tokens=False)
        data = self.bytes(token)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def _lp(x: float) -> float:
    return x if x >= FLOOR else FLOOR                  # -inf and NaN alike


def _entry(tt: TokenText, token: int, logprob: float) -> dict[str, Any]:
    return {"token": tt.text(token), "logprob": _lp(logprob), "bytes": list(tt.bytes(token))}


def chat_logprobs(tt: TokenText, sampled: list[Sampled]) -> dict[str, Any]:
    """The chat ``logprobs`` object of ``sampled`` tokens."""
    content = [{**_entry(tt, s.token, s.logprob if s.logprob is not None else -math.inf),
                "top_logprobs": [_entry(tt, t, lp) for t, lp in s.top]} for s in sampled]
    return {"content": content, "refusal": None}


def completion_logprobs(tt: TokenText, sampled: list[Sampled], offset: int = 0) -> tuple[dict[str, Any], int]:
    """The completions ``logprobs`` object of ``sampled`` tokens whose text starts at ``offset``, and the
    offset after them (to continue a stream)."""
    tokens, lps, tops, offsets = [], [], [], []
    for s in sampled:
        text = tt.text(s.token)
        top = {tt.text(t): _lp(lp) for t, lp in s.top}
        top.setdefault(text, _lp(s.logprob if s.logprob is not None else -math.inf))
        tokens.append(text)
        lps.append(_lp(s.logprob if s.logprob is not None else -math.inf))
        tops.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}, offset
