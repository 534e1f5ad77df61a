"""Shared fixtures of the model tests: the tiny checkpoint (generated once per session into a temporary
cache), models built from it, and single-threaded torch glue (see dsv4rt.model.runner._cpu_threads)."""
from __future__ import annotations

import pytest
import torch

import dsv4rt
from dsv4rt.registry import REGISTRY


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from dsv4rt.model.synthetic import tiny_checkpoint

    return tiny_checkpoint(root=str(tmp_path_factory.mktemp("dsv4rt-cache")))


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_dir):
    from dsv4rt.model.checkpoint import Checkpoint

    return Checkpoint(tiny_dir)


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def fresh_registry(monkeypatch):
    """No DSV4RT_* from the caller's shell and a fresh registry, undone afterwards."""
    import os

    for k in list(os.environ):
        if k.startswith("DSV4RT_"):
            monkeypatch.delenv(k)
    dsv4rt.refresh()
    REGISTRY.reset()
    yield monkeypatch
    monkeypatch.undo()
    dsv4rt.refresh()
    REGISTRY.reset()


def _build(ckpt, **kw):
    from dsv4rt.model.transformer import Transformer

    return Transformer(ckpt.cfg, ckpt, **kw)


@pytest.fixture(scope="session")
def build():
    """``build(checkpoint, **Transformer kwargs)`` -> a model."""
    return _build
