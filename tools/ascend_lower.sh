#!/usr/bin/env bash
# Lower every Triton kernel of backends/cuda/kernels through triton-ascend's front end to MLIR, per kernel.
#
#   tools/ascend_lower.sh [--ops op1,op2] [--chips a2a3,950] [--plans all|gpu|interp] [--launches FILE] [--jobs N]
#
# 1. Makes its own virtual environment (default /tmp/dsv4rt_ascend_lower/venv; DSV4RT_ASCEND_LOWER_DIR moves
#    it) with triton-ascend from PyPI (TRITON_ASCEND_VERSION, default 3.2.0; it needs Python 3.9-3.11:
#    PYTHON picks the interpreter). triton-ascend replaces community Triton, so it never goes into the
#    project's environment.
# 2. Records the kernel launches of the cuda backend's conformance run under the Triton interpreter, with the
#    project's Python and community Triton (tools/compile_check.py --capture), unless --launches is given.
#    --plans (default all): the launches the launchers plan for a GPU (what they plan for NPU tensors too:
#    backends/cuda/_launch.on_interpreter) and those they plan under the interpreter. Each launch is lowered
#    with the constexprs an NPU launch sets (tools/ascend_lower.py NPU_BUILD: INTERP off, DOT_PREC "hf32").
# 3. Runs tools/ascend_lower.py in the triton-ascend environment: Triton front end -> TTIR ->
#    triton-adapter-opt -> linalg / HIVM MLIR for the A2/A3 and the 950 pipelines, one row per kernel.
#
# No NPU and no CANN are needed, and nothing runs: the binary stage (bishengir-compile) is part of CANN.
# Exit status 1 when any launch fails to lower.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${DSV4RT_ASCEND_LOWER_DIR:-/tmp/dsv4rt_ascend_lower}
VERSION=${TRITON_ASCEND_VERSION:-3.2.0}
PY=${PYTHON:-python3}
PROJECT_PY=${PROJECT_PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python)}
OPS="" CHIPS="a2a3,950" LAUNCHES="" JOBS=2 PLANS=all
while [ $# -gt 0 ]; do
  case "$1" in
    --ops) OPS=$2; shift 2;;
    --chips) CHIPS=$2; shift 2;;
    --launches) LAUNCHES=$2; shift 2;;
    --plans) PLANS=$2; shift 2;;
    --jobs) JOBS=$2; shift 2;;
    *) echo "usage: $0 [--ops op1,op2] [--chips a2a3,950] [--plans all|gpu|interp] [--launches FILE] [--jobs N]" >&2
       exit 2;;
  esac
done
mkdir -p "$DIR"
INSTALLED=$("$DIR/venv/bin/python" -m pip show triton-ascend 2>/dev/null || true)
if ! grep -qx "Version: $VERSION" <<<"$INSTALLED"; then
  echo "== creating $DIR/venv with triton-ascend $VERSION" >&2
  "$PY" -m venv "$DIR/venv"
  "$DIR/venv/bin/python" -m pip install -q "triton-ascend==$VERSION" pybind11   # its backend imports pybind11
fi
if [ -z "$LAUNCHES" ]; then
  case "$PLANS" in all) KINDS="gpu interp";; gpu|interp) KINDS=$PLANS;; *) echo "--plans: all, gpu or interp" >&2; exit 2;; esac
  for kind in $KINDS; do   # one process per kind: compile_check's GPU-plan patches must not leak
    echo "== recording the kernel launches of the conformance run, $kind plans (community Triton)" >&2
    (cd "$ROOT" && "$PROJECT_PY" tools/compile_check.py --capture "$DIR/launches_$kind.json" --plans "$kind" \
      ${OPS:+--ops "$OPS"})
    LAUNCHES="$LAUNCHES $DIR/launches_$kind.json"
  done
fi
DIRTY=$(git -C "$ROOT" status --porcelain -- backends/cuda/kernels 2>/dev/null | wc -l)
echo "kernels: backends/cuda/kernels at $(git -C "$ROOT" log -1 --format='%h %cs' -- backends/cuda/kernels 2>/dev/null)$( \
  [ "$DIRTY" -gt 0 ] && echo ", with uncommitted changes in $DIRTY file(s)")"
echo "== lowering with triton-ascend $VERSION" >&2
cd "$DIR"
TRITON_CACHE_DIR="$DIR/cache" "$DIR/venv/bin/python" "$ROOT/tools/ascend_lower.py" $LAUNCHES --chips "$CHIPS" \
  --jobs "$JOBS" --json "$DIR/lowered.json" --markdown "$DIR/lowered.md" 2> >(grep -v "Invalid bishengir path format" >&2)
