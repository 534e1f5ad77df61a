#!/usr/bin/env bash
# dsv4rt next to llama.cpp on the CPU, same weights, same thread count (not in CI: it builds llama.cpp).
#
#   bash tools/peer_bench.sh            # in the project's virtual environment
#
# 1. llama.cpp: the source distribution of llama-cpp-python from PyPI (pip download, the only download of
#    llama.cpp), which vendors llama.cpp; its CPU backend and llama-bench built with cmake (GGML_NATIVE).
# 2. The converter's Python needs (transformers at the version its requirements pin, from PyPI) go into a
#    folder of their own ($WORK/pydeps), not into the project's environment.
# 3. Each preset: `dsv4rt synth` writes its seeded weights as a checkpoint, tools/peer_prepare.py adds a
#    tokenizer, tools/peer_convert.py runs llama.cpp's own convert_hf_to_gguf.py (--outtype q8_0: the FP8
#    weights become Q8_0, the FP4 experts are repacked to MXFP4, bf16 stays bf16).
# 4. tools/peer_bench.py: ROUNDS interleaved rounds of llama-bench (pp PROMPT, tg GEN) and
#    `dsv4rt run --checkpoint` on the same weights at THREADS threads; a table with versions and load.
# 5. tools/peer_kernels.sh: the kernel table (ggml MXFP4 / Q8_0 matmul vs dsv4rt fp4_gemm / fp8_gemm, same
#    shapes, THREADS threads, interleaved) on the same llama.cpp build; PEER_KERNELS=0 skips it.
#
# Settings (environment): PEER_WORK (default /tmp/dsv4rt-peer), PEER_THREADS (2), PEER_ROUNDS (3),
# PEER_PRESETS ("tiny flash-slice"), PEER_LAYERS (3) and PEER_EXPERTS (64) for flash-slice, PEER_PROMPT (128),
# PEER_GEN (32), DSV4RT_BATCH_INVARIANT (dsv4rt's mode, default 1), PEER_LLAMA_CPP_PYTHON (a version to pin, default the newest), PEER_JOBS (build jobs, nproc),
# PEER_KERNELS (1; 0 skips step 5; its own settings are in tools/peer_kernels.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${PEER_WORK:-/tmp/dsv4rt-peer}
THREADS=${PEER_THREADS:-2}
ROUNDS=${PEER_ROUNDS:-3}
PRESETS=${PEER_PRESETS:-"tiny flash-slice"}
LAYERS=${PEER_LAYERS:-3}
EXPERTS=${PEER_EXPERTS:-64}
PROMPT=${PEER_PROMPT:-128}
GEN=${PEER_GEN:-32}
JOBS=${PEER_JOBS:-$(nproc)}
PY=${PYTHON:-python}
mkdir -p "$WORK"
log() { echo "peer_bench: $*" >&2; }

# ---- 1. llama.cpp from the llama-cpp-python sdist -------------------------------------------------------
if ! ls "$WORK"/dl/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    log "downloading the llama-cpp-python source distribution"
    "$PY" -m pip download "llama-cpp-python${PEER_LLAMA_CPP_PYTHON:+==$PEER_LLAMA_CPP_PYTHON}" --no-deps \
        --no-binary :all: -d "$WORK/dl" >&2
fi
SDIST=$(ls "$WORK"/dl/llama_cpp_python-*.tar.gz | sort -V | tail -1)
PKG=$(basename "$SDIST" .tar.gz)
[ -d "$WORK/$PKG" ] || tar xzf "$SDIST" -C "$WORK"
SRC="$WORK/$PKG/vendor/llama.cpp"
BENCH="$SRC/build/bin/llama-bench"
if [ ! -x "$BENCH" ]; then
    log "building llama.cpp's CPU backend and llama-bench ($JOBS jobs; tens of minutes on 2 cores)"
    cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
    cmake --build "$SRC/build" --target llama-bench -j "$JOBS" >&2
fi

# ---- 2. the converter's Python dependencies ------------------------------------------------------------
PIN=$(grep -h '^transformers' "$SRC"/requirements/requirements-convert_legacy_llama.txt | head -1)
if [ ! -d "$WORK/pydeps/transformers" ]; then
    log "installing ${PIN:-transformers} for the converter into $WORK/pydeps"
    "$PY" -m pip install -q --target "$WORK/pydeps" "${PIN:-transformers}" >&2
fi

# ---- 3. checkpoints and their GGUF conversions ---------------------------------------------------------
MODELS=()
for P in $PRESETS; do
    CK="$WORK/ckpt-$P"
    EXTRA=()
    case "$P" in *slice) EXTRA=(--layers "$LAYERS" --experts "$EXPERTS"); CK="$CK-${LAYERS}l-${EXPERTS}e";; esac
    if [ ! -f "$CK/config.json" ]; then
        rm -rf "$CK"
        dsv4rt synth --preset "$P" --out "$CK" "${EXTRA[@]}" >&2
    fi
    [ -f "$CK/tokenizer.json" ] || "$PY" "$ROOT/tools/peer_prepare.py" "$CK" >&2
    GG="$CK.q8_0.gguf"
    if [ ! -f "$GG" ]; then
        log "converting $P with llama.cpp's convert_hf_to_gguf.py"
        PYTHONPATH="$WORK/pydeps${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$ROOT/tools/peer_convert.py" "$SRC" "$CK" \
            "$GG.part" --outtype q8_0 > "$CK.convert.log" 2>&1 || { tail -20 "$CK.convert.log" >&2; exit 1; }
        mv "$GG.part" "$GG"
    fi
    MODELS+=("$P=$CK:$GG")
done

# ---- 4. interleaved rounds -----------------------------------------------------------------------------
echo "date      $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine   $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores visible, $(free -g | awk '/Mem:/{print $2}') GiB," \
     "$(grep -o -w 'avx512f\|avx512_bf16\|avx512_vnni\|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "llama.cpp $PKG, llama-bench $("$BENCH" --version 2>&1 | head -1)"
echo "dsv4rt    $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- . 2>/dev/null || echo ' (+ local changes)'), torch $("$PY" -c 'import torch; print(torch.__version__)')"
echo "mode      DSV4RT_BATCH_INVARIANT=${DSV4RT_BATCH_INVARIANT:-1} (1, the default: batch-invariant; 0: the fastest kernel per shape)"
echo "load      $(uptime)"
"$PY" "$ROOT/tools/peer_bench.py" --llama-bench "$BENCH" --threads "$THREADS" --rounds "$ROUNDS" \
    --prompt "$PROMPT" --gen "$GEN" "${MODELS[@]}"
echo "load      $(uptime)"

# ---- 5. the kernel table -------------------------------------------------------------------------------
if [ "${PEER_KERNELS:-1}" != 0 ]; then
    echo
    PEER_WORK="$WORK" PEER_THREADS="$THREADS" PYTHON="$PY" bash "$ROOT/tools/peer_kernels.sh"
fi
