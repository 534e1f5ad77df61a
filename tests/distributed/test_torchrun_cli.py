"""`torchrun --nproc-per-node N -m dsv4rt run` and the layout rules (no process group needed for the latter)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from dsv4rt.cli import main
from dsv4rt.distributed import backend_for_device, check_layout, default_layout, split_range
from dsv4rt.model.config import preset


def _env(cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSV4RT_", "TRITON_"))}
    env.update(DSV4RT_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    return env


def test_readme_torchrun_example_passes_its_check(tmp_path):
    # the README's command as written (bf16, 32 new tokens): the verdict is fp32, teacher-forced, and must
    # hold for a correct build whatever bf16 does
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "dsv4rt", "run", "--backend", "cpu", "--tp", "2", "--ep", "2", "--check", "--quiet"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert out.count("model    tiny") == 1, "only rank 0 prints"
    assert "parallel 2 processes, torch.distributed gloo on cpu: tensor parallel 2 (attention), expert parallel 2 " \
        "(MoE)" in out
    assert re.search(r"^  per rank: 4/8 query heads, 1/2 wo_a groups, 8/16 indexer heads, ~130/259 vocab "
                     r"rows, 4/8 routed experts", out, re.M), out
    assert ("rank 1: tp group 0-1 rank 1 (heads 4-7, groups 1-1, vocab 130-258), ep group 0-1 rank 1 "
            "(experts 4-7)") in out
    assert "ops    fp32 activations, release quantisation, 2 processes (tp 2, ep 2)" in out
    assert re.search(r"^verdict  PASS: ops pass, network pass", out, re.M), out
    assert "bf16 (the run's dtype) vs the reference: top-1" in out


def _unreduced_worker(rank: int, world: int, ckpt: str, out_dir: str) -> None:
    """`run --tp 2 --ep 2 --check` with the attention output's TP all-reduce left out (a layout bug)."""
    import io

    from dsv4rt.distributed import Parallel
    from dsv4rt.model import runner

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    Parallel.tp_sum = lambda self, x: x
    text = io.StringIO()
    opts = runner.RunOptions(checkpoint=ckpt, backend="cpu", tp=2, ep=2, check=True, max_new_tokens=2,
                             progress=False)
    rc = runner._run(opts, text, True)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(f"rc={rc}\n{text.getvalue()}")


def test_check_fails_a_layout_bug_the_ops_cannot_see(tmp_path, tiny_dir):
    from _dist_util import spawn

    spawn(_unreduced_worker, 2, tiny_dir, str(tmp_path))
    out = (tmp_path / "rank0.txt").read_text()
    assert out.startswith("rc=1"), out
    assert re.search(r"^verdict  FAIL: ops pass, network FAIL", out, re.M), out


def test_single_process_prints_its_layout_and_rejects_tp_without_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DSV4RT_CACHE_DIR", str(tmp_path))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert main(["run", "--backend", "cpu", "--max-new-tokens", "1", "--quiet"]) == 0
    assert re.search(r"^parallel 1 process ", capsys.readouterr().out, re.M)
    assert main(["run", "--tp", "2", "--quiet"]) == 2
    assert "torchrun --nproc-per-node 2 -m dsv4rt run --tp 2" in capsys.readouterr().err


def test_layout_rules():
    tiny = preset("tiny")                  # 8 heads, 2 wo_a groups, 16 indexer heads, 8 experts
    assert default_layout(tiny, 2) == (2, 2)
    assert default_layout(tiny, 4) == (2, 4)          # 2 wo_a groups: at most tp 2
    assert default_layout(tiny, 3) == (1, 1)
    assert default_layout(preset("flash"), 8) == (8, 8)
    with pytest.raises(ValueError, match="o_groups 2 must be multiples of tp 4"):
        check_layout(tiny, 4, 4, 4)
    with pytest.raises(ValueError, match="n_routed_experts 8 must be a multiple of ep 3"):
        check_layout(tiny, 3, 1, 3)
    with pytest.raises(ValueError, match="tp 2 does not divide the world size 3"):
        check_layout(tiny, 3, 2, 1)
    assert [split_range(259, 4, i) for i in range(4)] == [(0, 65), (65, 130), (130, 195), (195, 259)]
    assert [split_range(1, 4, i) for i in range(4)] == [(0, 1), (1, 1), (1, 1), (1, 1)]
    assert [backend_for_device(d) for d in ("cuda", torch.device("cuda", 1), "npu", "cpu")] == \
        ["nccl", "nccl", "hccl", "gloo"]
    with pytest.raises(ValueError, match="no torch.distributed backend"):
        backend_for_device("meta")
