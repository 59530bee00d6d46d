#!/usr/bin/env bash
# Create .venv (if missing) and install tclf with its test extras into it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"
# musicnn's trained weights (--backbone musicnn): its package holds them. Only its checkpoint
# files are read, never its code, so its stale pins (numpy < 1.17) are skipped with --no-deps.
.venv/bin/python -m pip install --quiet --no-deps "musicnn==0.1.0"
