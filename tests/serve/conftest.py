"""Fixtures of the serving tests: tokenizer.json files in the released DeepSeek-V4 / V4.1 layout
(:mod:`v4_tokenizer`) and a tiny-shaped checkpoint with V4's 129,280-id vocabulary."""
from __future__ import annotations

import json
import os

import pytest

from v4_tokenizer import V41_IDS, VOCAB, build_tokenizer_json


@pytest.fixture(scope="session")
def v4_tokenizer_json(tmp_path_factory) -> str:
    pytest.importorskip("tokenizers", reason="reading tokenizer.json needs tokenizers (pip install 'dsv4rt[dev]')")
    return build_tokenizer_json(str(tmp_path_factory.mktemp("v4tok") / "tokenizer.json"))


@pytest.fixture(scope="session")
def v41_tokenizer_json(tmp_path_factory) -> str:
    pytest.importorskip("tokenizers", reason="reading tokenizer.json needs tokenizers (pip install 'dsv4rt[dev]')")
    return build_tokenizer_json(str(tmp_path_factory.mktemp("v41tok") / "tokenizer.json"), V41_IDS)


@pytest.fixture(scope="session")
def v4_vocab_checkpoint(tmp_path_factory) -> str:
    """The tiny preset's shapes with V4's 129,280-id vocabulary and random weights (model_type deepseek_v4,
    as every checkpoint written here), without a tokenizer.json: the tests pass one with --tokenizer."""
    from dsv4rt.model.checkpoint import write_checkpoint
    from dsv4rt.model.config import preset
    from dsv4rt.model.synthetic import SyntheticSource

    cfg = preset("tiny", vocab_size=VOCAB, extra={"preset": "tiny-v4-vocab"})
    src = SyntheticSource(cfg, seed=0)
    path = write_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-v4-vocab"), cfg,
                            ((n, src.get(n)) for n in src.names()), max_shard_bytes=256 << 20)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["model_type"] == "deepseek_v4"
    return path
