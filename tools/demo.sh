#!/usr/bin/env bash
# The main job on bundled demo data, from a fresh clone:
#   synthetic audio -> tclf-extract -> tclf-pack -> tclf-train (CPU, --weights none)
#   -> models/vN/ and models/latest.h5 -> tclf predict on three new tracks, synthesized
#   with another seed (never seen in training or validation).
# The demo audio is synthetic (tclf/demo.py), not real music.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2
. .venv/bin/activate
start=$(date +%s)
python tools/make_demo_data.py audio/ --tracks-per-style 16 --duration 75 --seed 0
tclf extract audio/ data/ --quiet
tclf pack data/ records/ --overwrite --quiet
# --weights none: ImageNet weights cannot be downloaded offline. On a GPU machine drop it and
# use --gpus all (the default) for mixed precision on every GPU.
tclf train --weights none --records records --models-dir models --verbose 2
python tools/make_demo_data.py new_audio/ --tracks-per-style 1 --duration 75 --seed 1
tclf predict new_audio/ --format table
echo "demo finished in $(( $(date +%s) - start )) s"
