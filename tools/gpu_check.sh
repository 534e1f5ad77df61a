#!/usr/bin/env bash
# One-call GPU check of the cuda backend: environment, conformance, bench, model runs.
#
#   OUT=/some/dir bash tools/gpu_check.sh [STEP ...]      STEP in: env conformance bench run slice
#
# With no STEP every step runs, in that order. Each step has its own timeout (override with
# GPU_CHECK_T_<STEP>=seconds) and the script keeps going past a failing or timed-out step, so one crash
# does not cost the rest. Everything lands under $OUT (at most 7 files, one folder level):
#   log.txt       every step's output, with its exit code and wall time
#   summary.txt   one line per step: name, exit code, seconds
#   conf.json     dsv4rt conformance --backend cuda --report
#   bench.json    dsv4rt bench --backend cuda --json
#   roofline.png  dsv4rt bench --plot
#   run.txt       dsv4rt run --backend cuda --check   (tiny preset: fp32 verdict against the float64 reference
#                 ops, bf16 agreement measured; docs/verification.md)
#   slice.txt     dsv4rt run --preset flash-slice --layers 4 --prompt-len 1024 --max-new-tokens 64
#
# The package is installed into the machine's own Python (no network there: no build isolation, no
# dependencies fetched; torch and Triton are the image's). Set GPU_CHECK_NO_INSTALL=1 to skip that.
# A dry run on a machine without a GPU: GPU_CHECK_NO_INSTALL=1 DSV4RT_TRITON_INTERPRET=1 PYTHON=.venv/bin/python
# OUT=/tmp/gc bash tools/gpu_check.sh conformance (the Triton kernels under the interpreter, CPU tensors).
set -u
OUT="${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(env conformance bench run slice)
for s in "${steps[@]}"; do
    case "$s" in env|conformance|bench|run|slice) ;;
        *) echo "gpu_check: unknown step '$s' (expected: env conformance bench run slice)" >&2; exit 2 ;;
    esac
done

# step NAME DEFAULT_TIMEOUT SCRIPT : run the bash SCRIPT (pipefail) with a timeout, log it, record rc and seconds
step() {
    local name="$1" default_t="$2" script="$3"
    local var="GPU_CHECK_T_${name^^}" t rc start
    t="${!var:-$default_t}"
    echo "===== $name (timeout ${t}s): $script" | tee -a "$LOG"
    start=$(date +%s)
    timeout --kill-after=10 "$t" bash -o pipefail -c "$script" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "===== $name: rc=$rc ($(( $(date +%s) - start )) s)" | tee -a "$LOG"
    printf '%-12s rc=%-4s %5ss\n' "$name" "$rc" "$(( $(date +%s) - start ))" >>"$SUMMARY"
}

env_report() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    "$PY" - <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:  # the report must go on without it
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
          f"capability {p.major}.{p.minor}")
PY
    if [[ "${GPU_CHECK_NO_INSTALL:-0}" != 1 ]]; then
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 1
    fi
    "$PY" -m dsv4rt info
}

export -f env_report
export PY OUT
for s in "${steps[@]}"; do
    case "$s" in
        env)         step env 240 env_report ;;
        conformance) step conformance 300 '"$PY" -m dsv4rt conformance --backend cuda --report "$OUT/conf.json"' ;;
        bench)       step bench 420 '"$PY" -m dsv4rt bench --backend cuda --json "$OUT/bench.json" --plot "$OUT/roofline.png"' ;;
        run)         step run 180 '"$PY" -m dsv4rt run --backend cuda --check --quiet 2>&1 | tee "$OUT/run.txt"' ;;
        slice)       step slice 300 '"$PY" -m dsv4rt run --preset flash-slice --layers 4 --backend cuda --prompt-len 1024 --max-new-tokens 64 --quiet 2>&1 | tee "$OUT/slice.txt"' ;;
    esac
done
cat "$SUMMARY"
