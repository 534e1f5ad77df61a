"""dsv4rt's own prompt encoder and output parser for the DeepSeek-V4 chat format (the release ships no
Jinja template, only ``encoding/encoding_dsv4.py``; V4.1 ``encoding/encoding.py``).

* :mod:`.tokens` -- the control-token strings; :mod:`.dsml` -- tool-call markup and the tools section;
* :mod:`.render` -- the encoder, parameterised by a :class:`~.render.Dialect`; :mod:`.dsv4` and
  :mod:`.dsv41` -- the two dialects; :mod:`.parser` -- the streaming completion parser.

:func:`dialect_for` picks the dialect of a checkpoint's ``model_type`` (``config.json``; a V4.1 checkpoint
says ``deepseek_v41`` at the top level and ``deepseek_v41_text`` in ``text_config``).
"""
from __future__ import annotations

import json
import os

from .dsv4 import DSV4
from .dsv41 import DSV41
from .parser import OutputParser
from .render import Dialect, render

__all__ = ["DIALECTS", "Dialect", "OutputParser", "dialect_for", "read_model_type", "render"]

DIALECTS: dict[str, Dialect] = {"deepseek_v4": DSV4, "deepseek_v41": DSV41, "deepseek_v41_text": DSV41}


def dialect_for(model_type: str | None) -> Dialect | None:
    """The dialect of ``model_type`` (None for a model this package does not encode)."""
    return DIALECTS.get(model_type) if model_type else None


def read_model_type(checkpoint_dir: str) -> str | None:
    """``model_type`` of ``checkpoint_dir/config.json`` (None when the file or the key is missing)."""
    path = os.path.join(checkpoint_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    value = cfg.get("model_type") if isinstance(cfg, dict) else None
    return value if isinstance(value, str) else None
