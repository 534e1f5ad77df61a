#!/usr/bin/env bash
# The kernel table of the peer comparison: ggml's MXFP4 / Q8_0 matmul next to dsv4rt's fp4_gemm / fp8_gemm,
# same shapes, same thread count, interleaved (not in CI). Needs the llama.cpp build of tools/peer_bench.sh
# (its ggml libraries); downloads and builds nothing else.
#
#   bash tools/peer_kernels.sh          # in the project's virtual environment; a few minutes at the defaults
#
# Compiles tools/peer_kernels.cpp against that build's libggml*.so (into $WORK/peer_kernels) and runs
# tools/peer_kernels.py. Settings (environment): PEER_WORK (as peer_bench.sh, default /tmp/dsv4rt-peer),
# PEER_THREADS (2), PEER_KERNEL_ROUNDS (3), PEER_KERNEL_REPS (timed calls per case and round, 10),
# PEER_KERNEL_COLD (1: also time M=1 with the weights flushed from the caches), PEER_KERNEL_ARGS (more
# arguments for peer_kernels.py, e.g. "--ms 1,8").
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${PEER_WORK:-/tmp/dsv4rt-peer}
THREADS=${PEER_THREADS:-2}
PY=${PYTHON:-python}
SDIST=$(ls "$WORK"/dl/llama_cpp_python-*.tar.gz 2>/dev/null | sort -V | tail -1 || true)
[ -n "$SDIST" ] || { echo "peer_kernels: no llama.cpp under $WORK (run tools/peer_bench.sh first, or set PEER_WORK)" >&2; exit 1; }
PKG=$(basename "$SDIST" .tar.gz)
SRC="$WORK/$PKG/vendor/llama.cpp"
LIB="$SRC/build/bin"
if [ ! -f "$LIB/libggml-cpu.so" ]; then
    echo "peer_kernels: building ggml's CPU backend in $SRC/build" >&2
    [ -f "$SRC/build/CMakeCache.txt" ] || cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >&2
    cmake --build "$SRC/build" --target ggml -j "${PEER_JOBS:-$(nproc)}" >&2
fi
BIN="$WORK/peer_kernels"
if [ ! -x "$BIN" ] || [ "$ROOT/tools/peer_kernels.cpp" -nt "$BIN" ]; then
    g++ -O2 -std=c++17 -I"$SRC/ggml/include" "$ROOT/tools/peer_kernels.cpp" -o "$BIN" \
        -L"$LIB" -lggml -lggml-cpu -lggml-base -Wl,-rpath,"$LIB"
fi
COLD=()
[ "${PEER_KERNEL_COLD:-1}" = 1 ] && COLD=(--cold-mb 96)
# shellcheck disable=SC2086
"$PY" "$ROOT/tools/peer_kernels.py" --ggml "$BIN" --threads "$THREADS" --rounds "${PEER_KERNEL_ROUNDS:-3}" \
    --reps "${PEER_KERNEL_REPS:-10}" --llama-cpp "$PKG ($(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo '?'))" \
    "${COLD[@]}" ${PEER_KERNEL_ARGS:-}
