#!/usr/bin/env bash
# Run the cuda backend's conformance under Triton's interpreter (CPU, no GPU) on several Triton versions,
# each in its own virtual environment:
#
#     bash tools/triton_versions.sh [VERSION ...]        # default: 3.9.0 3.6.0
#
# Each venv gets the CPU torch of the install command, the given triton and this checkout (editable).
# Prints one PASS / FAIL line per version; exit 1 if any fails. Set KEEP=1 to keep the venvs in
# ${TMPDIR:-/tmp}/dsv4rt-triton-VERSION for reruns.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
versions=("$@")
[[ ${#versions[@]} -gt 0 ]] || versions=(3.9.0 3.6.0)
status=0
summary=()
for v in "${versions[@]}"; do
    venv="${TMPDIR:-/tmp}/dsv4rt-triton-$v"
    [[ -x "$venv/bin/python" ]] || "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install -q "$TORCH" "triton==$v" && "$venv/bin/pip" install -q -e .
    start=$(date +%s)
    if DSV4RT_TRITON_INTERPRET=1 "$venv/bin/python" -m dsv4rt conformance --backend cuda > "$venv/conformance.txt" 2>&1; then
        summary+=("triton $v: PASS ($(tail -1 "$venv/conformance.txt"); $(( $(date +%s) - start )) s)")
    else
        summary+=("triton $v: FAIL (see $venv/conformance.txt: $(tail -1 "$venv/conformance.txt"))")
        status=1
    fi
    [[ "${KEEP:-0}" == 1 ]] || [[ $status == 1 ]] || rm -rf "$venv"
done
printf '%s\n' "${summary[@]}"
exit $status
