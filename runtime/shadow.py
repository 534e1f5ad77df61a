"""Detect a folder named ``dsv4rt`` that shadows the installed package.

A clone of this repository in a folder named ``dsv4rt`` has no ``__init__.py`` at its top (the package
is ``runtime/``). Run from that folder's parent, ``python -m dsv4rt``, ``torchrun -m dsv4rt`` or a script
that imports dsv4rt finds the folder first on ``sys.path`` (the current directory / the script's folder)
and imports it as an empty namespace package instead of the editable install, so the import fails with
``cannot import name '__version__' from 'dsv4rt' (unknown location)``. No code of dsv4rt runs in that
case, so the check lives here and runs from the ``dsv4rt`` console script (which is unaffected: its
``sys.path[0]`` is the scripts folder) and in ``dsv4rt info``.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable

__all__ = ["shadowing_folders", "shadowing_warning"]

_FIX = ("run from another directory, rename the clone (git clone ... dsv4rt-src; then pip install -e . again), "
        "or install it non-editable (pip install .), whose regular package wins over a namespace folder")


def shadowing_folders(cwd: str | None = None, path: Iterable[str] | None = None) -> list[str]:
    """Folders named ``dsv4rt`` without ``__init__.py`` in the current directory or in ``sys.path`` entries,
    each of which Python would import as an empty namespace package in place of an editable install."""
    cwd = os.getcwd() if cwd is None else cwd
    roots = [cwd] + [p or cwd for p in (sys.path if path is None else path)]
    found: list[str] = []
    for root in dict.fromkeys(os.path.abspath(r) for r in roots):
        folder = os.path.join(root, "dsv4rt")
        if os.path.isdir(folder) and not os.path.exists(os.path.join(folder, "__init__.py")) and folder not in found:
            found.append(folder)
    return found


def shadowing_warning(cwd: str | None = None, path: Iterable[str] | None = None) -> str | None:
    """The warning to print, or None when nothing shadows the package."""
    folders = shadowing_folders(cwd, path)
    if not folders:
        return None
    return (f"warning: {', '.join(folders)} is a folder named dsv4rt without __init__.py (a clone of the repository?): "
            f"`python -m dsv4rt`, `torchrun -m dsv4rt` and scripts run from {os.path.dirname(folders[0])} import it "
            f"as an empty namespace package instead of dsv4rt (ImportError: cannot import name '__version__' from "
            f"'dsv4rt' (unknown location)). Fix: {_FIX}.")
