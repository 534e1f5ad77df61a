"""Compile every Triton kernel of backends/cuda/kernels ahead of time for sm_90a; exit 1 on a failure or a spill.

Kept for the commands that name it: ``tools/compile_check.py --targets sm_90a --fail-on-spill`` (see that tool
for the other targets: sm_80, sm_86, sm_89, sm_90a, sm_100a, sm_120a). Needs no GPU.

    python tools/compile_sm90.py [--ops fp4_gemm,...] [--jobs N]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compile_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] + ["--fail-on-spill"], default_targets=("sm_90a",)))
