#!/usr/bin/env bash
# The GPU path's first run, in one command, by anyone with an NVIDIA GPU:
#
#     bash bench/gpu_smoke.sh            # or: SIZE_GB=8 VENV=/tmp/v bash bench/gpu_smoke.sh
#
# Installs streammerge with torch (CUDA build from the default index) and triton into a
# fresh venv, then runs bench/gpu_smoke.py: the GPU tests, the kernel benchmark (GB/s
# against the device's copy bandwidth) and an end-to-end merge of a synthetic trio on the
# GPU against numba's bytes. Prints one markdown table to paste into an issue.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-gpu}"
SIZE_GB="${SIZE_GB:-2}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch
python -m pip install -q -e ".[test,gpu]"
command -v gcc >/dev/null || command -v cc >/dev/null \
    || echo "gpu_smoke: no C compiler found: Triton needs one to build its driver stub" >&2
unset TRITON_INTERPRET
exec python bench/gpu_smoke.py --size-gb "$SIZE_GB" "$@"
