"""Fixtures of the distributed tests: the tiny checkpoint (generated once per session into a temporary cache)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from dsv4rt.model.synthetic import tiny_checkpoint

    return tiny_checkpoint(root=str(tmp_path_factory.mktemp("dsv4rt-cache")))
