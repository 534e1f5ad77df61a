"""``--preset NAME`` for every command, with one set of names and errors that say what to do.

The presets of :data:`dsv4rt.model.config.PRESETS` come in two kinds: configs of the released models
(``flash``, ``pro``, ``flash41``: their weights only come from a downloaded checkpoint) and synthetic models
whose seeded random weights dsv4rt draws itself (``tiny``, ``flash-slice``, ``tiny-v41``, ``flash41-slice``).
``kv-cache`` takes both (it needs a config only); ``run``, ``serve``, ``loadtest`` and ``synth`` need weights,
so they take the synthetic ones and answer a released name with the two ways to get what was asked for.
The check runs while arguments are parsed (an ``argparse.Action``) and raises :class:`PresetError`, which
``dsv4rt`` prints as one line, without the usage dump of an argparse ``choices`` error.
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence

from .errors import Dsv4rtError

__all__ = ["SYNTHETIC", "RELEASED", "ALL", "PresetError", "PresetAction", "check_preset"]

SYNTHETIC: tuple[str, ...] = ("tiny", "flash-slice", "tiny-v41", "flash41-slice")
# released model -> (its name, the synthetic preset at its widths)
RELEASED: dict[str, tuple[str, str]] = {"flash": ("DeepSeek-V4-Flash", "flash-slice"),
                                        "pro": ("DeepSeek-V4-Pro", "flash-slice"),
                                        "flash41": ("DeepSeek-V4.1-Flash", "flash41-slice")}
ALL: tuple[str, ...] = (*RELEASED, *SYNTHETIC)


class PresetError(Dsv4rtError):
    """A ``--preset`` name the command cannot use; ``prog`` is the command (``dsv4rt run``)."""

    def __init__(self, prog: str, message: str) -> None:
        self.prog = prog
        super().__init__(message)


def check_preset(name: str, allowed: Sequence[str], prog: str, option: str = "--preset") -> str:
    """``name`` if ``allowed`` holds it, else a :class:`PresetError` saying what to use instead (``option``:
    the flag that took it, as the user typed it)."""
    if name in allowed:
        return name
    if name in RELEASED and name not in allowed:
        model, synthetic = RELEASED[name]
        raise PresetError(prog, f"{option} {name} is the released {model}, whose weights come only from its "
                          f"checkpoint: download it and give run / serve / loadtest --checkpoint DIR (README.md, 'Real "
                          f"weights'), or "
                          f"use {option} {synthetic} for synthetic weights at its widths. `dsv4rt kv-cache --preset "
                          f"{name}` takes the config alone.")
    raise PresetError(prog, f"unknown preset {name!r}; this command takes {', '.join(allowed)}"
                      + ("" if set(allowed) >= set(RELEASED) else
                         f" (kv-cache also takes the released configs {', '.join(RELEASED)})"))


class PresetAction(argparse.Action):
    """``--preset`` checked by :func:`check_preset` against ``allowed`` (default: the synthetic presets)."""

    def __init__(self, option_strings: list[str], dest: str, allowed: Sequence[str] = SYNTHETIC,
                 append: bool = False, **kwargs: Any) -> None:
        self.allowed, self.append = tuple(allowed), append
        kwargs.setdefault("metavar", "NAME")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        name = check_preset(str(values), self.allowed, parser.prog, option_string or "--preset")
        if self.append:  # a repeatable flag (bench --model): collect the names
            name = [*(getattr(namespace, self.dest, None) or []), name]
        setattr(namespace, self.dest, name)
