"""Seeded fuzzing of the checkpoint loader: malformed safetensors files and hostile checkpoint directories.

Every case must end in a CheckpointError naming the file (and the tensor where there is one) or in a
clean load whose tensors read back; any other exception, a hang or a crash fails. The fast subset runs
by default; ``--fuzz-full`` runs every seed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from dsv4rt.errors import CheckpointError
from dsv4rt.model.checkpoint import INDEX_NAME, Checkpoint, write_checkpoint
from dsv4rt.model.config import preset
from dsv4rt.model.shard import ShardFile
from dsv4rt.model.synthetic import SyntheticSource

_DTYPES = [torch.float32, torch.bfloat16, torch.int8, torch.int64, torch.float8_e4m3fn, torch.float8_e8m0fnu]


def _valid_file(path: str, rng: random.Random) -> dict:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    tensors = {}
    for i in range(rng.randint(1, 4)):
        shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 3)))
        raw = torch.randint(0, 100, shape, generator=g, dtype=torch.uint8)
        tensors[f"t{i}"] = raw.view(torch.int8).to(_DTYPES[i % len(_DTYPES)]) if i % 2 else raw.view(torch.int8)
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors


def _header(path: str) -> tuple[int, dict, bytes]:
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _write_raw(path: str, header: bytes, body: bytes) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + body)


def _mutate(path: str, rng: random.Random, kind: str) -> None:
    n, hdr, body = _header(path)
    names = [k for k in hdr if k != "__metadata__"]
    name = rng.choice(names)
    if kind == "truncate":
        os.truncate(path, rng.randrange(0, os.path.getsize(path)))
        return
    if kind == "deep":
        depth = rng.choice([1000, 10_000, 100_000])
        inner = rng.choice([("[", "]"), ('{"a":', "}")])
        raw = (inner[0] * depth + "1" + inner[1] * depth).encode()
        if rng.random() < 0.5:  # nested as a whole header, or inside one entry
            raw = json.dumps({name: {**hdr[name], "x": "@"}}).encode().replace(b'"@"', raw)
        _write_raw(path, raw, body)
        return
    if kind == "bytes":
        data = bytearray(open(path, "rb").read())
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(0, 8 + n)] = rng.randrange(256)
        open(path, "wb").write(bytes(data))
        return
    if kind == "length":
        data = open(path, "rb").read()
        bad = rng.choice([0, 1, n - 1, n + 1, 1 << 40, (1 << 64) - 1])
        open(path, "wb").write(struct.pack("<Q", bad) + data[8:])
        return
    e = hdr[name]
    if kind == "offsets_out":
        e["data_offsets"][1] += rng.randint(1, 1 << 20)
    elif kind == "float_offsets":
        e["data_offsets"] = [float(v) + rng.choice([0.0, 0.5]) for v in e["data_offsets"]]
    elif kind == "float_shape":
        e["shape"] = [float(s) + rng.choice([0.0, 0.5]) for s in e["shape"]]
    elif kind == "negative":
        e[rng.choice(["shape", "data_offsets"])][0] = -rng.randint(1, 9)
    elif kind == "dtype":
        e["dtype"] = rng.choice(["F99", "", "f32", 7, None])
    elif kind == "metadata":
        hdr["__metadata__"] = rng.choice([[1, 2], 5, "pt", {"a": {"b": 1}}, {"a": 3}])
    elif kind == "entry":
        hdr[name] = rng.choice([5, "x", [], {"dtype": "F32"}, None])
    raw = json.dumps(hdr).encode()
    if kind == "duplicate":
        raw = raw[:-1] + b"," + json.dumps(name).encode() + b":" + json.dumps(e).encode() + b"}"
    _write_raw(path, raw + b" " * (-len(raw) % 8), body)


_FILE_KINDS = ["truncate", "deep", "bytes", "length", "offsets_out", "float_offsets", "float_shape", "negative",
               "dtype", "metadata", "entry", "duplicate"]
# mutations that can never leave a valid file (a byte flip or a truncation at the end may)
_ALWAYS_BAD = set(_FILE_KINDS) - {"bytes", "float_shape", "float_offsets", "truncate"}


def _seeds(fuzz_full: bool, fast: int, full: int) -> range:
    return range(full if fuzz_full else fast)


@pytest.mark.parametrize("kind", _FILE_KINDS)
def test_malformed_files_give_checkpoint_errors(tmp_path, fuzz_full, kind):
    for seed in _seeds(fuzz_full, 6, 60):
        rng = random.Random(f"{kind}-{seed}")
        path = str(tmp_path / f"{kind}-{seed}.safetensors")
        _valid_file(path, rng)
        _mutate(path, rng, kind)
        try:
            st = ShardFile(path)
            for name in st.entries:
                st.read(name)
        except CheckpointError as exc:
            assert path in str(exc), (kind, seed, str(exc))
        else:
            assert kind not in _ALWAYS_BAD, f"{kind} seed {seed}: a malformed file was accepted"


def test_float_offsets_and_shapes_are_refused_not_truncated(tmp_path):
    path = str(tmp_path / "f.safetensors")
    _valid_file(path, random.Random(0))
    n, hdr, body = _header(path)
    hdr["t0"]["shape"] = [float(s) for s in hdr["t0"]["shape"]]
    _write_raw(path, json.dumps(hdr).encode(), body)
    with pytest.raises(CheckpointError, match="f.safetensors: safetensors header is not valid JSON"):
        ShardFile(path)


# ---- hostile checkpoint directories ----------------------------------------------------------------

def _small_cfg():
    return preset("tiny", n_layers=1, n_mtp_layers=0, compress_ratios=(0,), n_routed_experts=2,
                  n_activated_experts=1, n_hash_layers=0)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    cfg = _small_cfg()
    src = SyntheticSource(cfg, 0, mtp=False)
    return write_checkpoint(str(tmp_path_factory.mktemp("ck") / "small"), cfg,
                            ((n, src.get(n)) for n in src.names()), max_shard_bytes=256 << 10)


def _edit_index(root: str, fn) -> None:
    path = os.path.join(root, INDEX_NAME)
    idx = json.load(open(path))
    fn(idx["weight_map"])
    json.dump(idx, open(path, "w"))


def _directory_case(root: str, outside: str, rng: random.Random, kind: str) -> None:
    idx = json.load(open(os.path.join(root, INDEX_NAME)))["weight_map"]
    tensor = rng.choice(sorted(idx))
    shard = os.path.join(root, idx[tensor])
    if kind == "index_path":
        target = rng.choice(["../outside.safetensors", "sub/../../outside.safetensors", "..", ".", "", 7,
                             None, "a\\b.safetensors", "../" * rng.randint(2, 6) + "etc/passwd"])
        _edit_index(root, lambda m: m.__setitem__(tensor, target))
    elif kind == "absolute":
        _edit_index(root, lambda m: m.__setitem__(tensor, rng.choice([outside, "/etc/passwd", "/dev/zero"])))
    elif kind == "symlink_out":
        os.replace(shard, outside)
        os.symlink(outside if rng.random() < 0.5 else os.path.relpath(outside, root), shard)
    elif kind == "special":  # a FIFO or a directory in place of a shard the index names
        os.remove(shard)
        os.mkfifo(shard) if rng.random() < 0.5 else os.mkdir(shard)
    elif kind == "index":
        open(os.path.join(root, INDEX_NAME), "w").write(rng.choice(["{", "[]", '{"weight_map": 5}', "",
                                                                     '{"weight_map": []}']))
    elif kind == "duplicate":  # one tensor stored in two shards, the index naming one
        others = sorted(set(idx.values()) - {idx[tensor]})
        st = ShardFile(shard)
        extra = os.path.join(root, others[0])
        tensors = {n: ShardFile(extra).read(n).clone() for n in ShardFile(extra).entries}
        tensors[tensor] = st.read(tensor).clone()
        save_file(tensors, extra)
    elif kind in ("wrong_dtype", "wrong_shape"):
        st = ShardFile(shard)
        tensors = {n: st.read(n).clone() for n in st.entries}
        t = tensors[tensor]
        if kind == "wrong_dtype":
            new = rng.choice([d for d in _DTYPES if d != t.dtype])
            tensors[tensor] = torch.zeros(t.shape, dtype=torch.float32).to(new)
        else:
            tensors[tensor] = torch.zeros(tuple(s + rng.randint(1, 3) for s in t.shape) or (2,), dtype=t.dtype)
        save_file(tensors, shard)


_DIR_KINDS = ["index_path", "absolute", "symlink_out", "special", "index", "duplicate", "wrong_dtype", "wrong_shape"]


@pytest.mark.parametrize("kind", _DIR_KINDS)
def test_hostile_directories_give_checkpoint_errors(tmp_path, small_dir, fuzz_full, kind):
    for seed in _seeds(fuzz_full, 3, 25):
        rng = random.Random(f"{kind}-{seed}")
        root = str(tmp_path / f"{kind}-{seed}")
        shutil.copytree(small_dir, root)
        outside = str(tmp_path / f"outside-{seed}.safetensors")
        shutil.copy(os.path.join(root, sorted(f for f in os.listdir(root) if f.endswith(".safetensors"))[0]), outside)
        _directory_case(root, outside, rng, kind)
        with pytest.raises(CheckpointError) as err:
            ck = Checkpoint(root)
            for n in ck.names():
                ck.get(n)
        assert root in str(err.value) or os.path.basename(root) in str(err.value), (kind, seed, str(err.value))


@pytest.mark.parametrize("name", ["model\x00.safetensors", "\x00", "a/\x00/../b.safetensors", "\ud800.safetensors",
                                  "model-1.safetensors\x00.txt"])
def test_unusable_shard_names_give_checkpoint_errors(tmp_path, small_dir, name):
    """A shard name no file can have (a NUL byte; a lone surrogate, which the file system cannot encode)
    is refused as a CheckpointError naming the index and the tensor (os.path raised ValueError before)."""
    root = str(tmp_path / "bad-name")
    shutil.copytree(small_dir, root)
    tensor = sorted(json.load(open(os.path.join(root, INDEX_NAME)))["weight_map"])[0]
    _edit_index(root, lambda m: m.__setitem__(tensor, name))
    with pytest.raises(CheckpointError) as err:
        Checkpoint(root)
    assert INDEX_NAME in str(err.value) and repr(tensor) in str(err.value), str(err.value)


_FIFO_CHILD = """
import os, sys, json
from dsv4rt.errors import CheckpointError
from dsv4rt.model.checkpoint import Checkpoint
root = sys.argv[1]
try:
    Checkpoint(root)
except CheckpointError as exc:
    print("CheckpointError", exc)
"""


@pytest.mark.parametrize("where", ["shard", "index"])
def test_a_fifo_never_blocks(tmp_path, small_dir, where):
    """Without an index a FIFO named *.safetensors is listed; with a FIFO as the index: both refused
    (in a child process with a timeout, as the old loader blocked in open() forever)."""
    root = str(tmp_path / "fifo")
    shutil.copytree(small_dir, root)
    if where == "shard":
        os.remove(os.path.join(root, INDEX_NAME))
        os.mkfifo(os.path.join(root, "zzz.safetensors"))
    else:
        os.remove(os.path.join(root, INDEX_NAME))
        os.mkfifo(os.path.join(root, INDEX_NAME))
    out = subprocess.run([sys.executable, "-c", _FIFO_CHILD, root], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "CheckpointError" in out.stdout and "not a regular file" in out.stdout, out.stdout
