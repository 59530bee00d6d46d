#!/usr/bin/env bash
# Check tclf on a machine with one GPU, once, offline, in under 8 minutes (tools/gpu_check.py).
#
#   bash tools/gpu_check.sh [--no-write] [--skip-tests] [--pngs DIR] [--out FILE]
#
# With TensorFlow (this repo's .venv, or a python3 that has it) and a GPU: the full check with
# tclf's own code. Without TensorFlow but with JAX or PyTorch and a GPU: Keras 3 on that
# backend (only keras and its small pure-Python dependencies needed, e.g. from wheels; put
# them on PYTHONPATH). Without a GPU: what can run on the CPU, and a list of what was skipped.
# With a GPU it rewrites the "gpu" section of BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=${PYTHON:-python3}
fi
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" tools/gpu_check.py "$@"
