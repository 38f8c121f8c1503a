#!/usr/bin/env bash
# `make gpu-check` on an offline GPU machine that has torch, transformers, peft and accelerate but not this
# project's venv, from the bundle `make gpu-bundle` writes. Copy the repo with .gpu_bundle/ over, then in its root:
#   bash scripts/gpu_offline.sh OUT_DIR [more gpu_check.py arguments]
# Writes OUT_DIR/gpu_check.md, OUT_DIR/gpu_check.log and OUT_DIR/gpu_check_logs.tgz (each case's log and record).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:?usage: bash scripts/gpu_offline.sh OUT_DIR [gpu_check.py arguments]}; shift
PY=${PYTHON:-python3}
B=${BUNDLE:-.gpu_bundle}
SITE=${SITE:-/tmp/sparsetune_site}
mkdir -p "$OUT_DIR"
"$PY" - <<'PY'
from importlib.metadata import version
import torch
print("python packages:", ", ".join(f"{p} {version(p)}" for p in (
    "torch", "transformers", "peft", "accelerate", "huggingface_hub", "pyarrow", "fsspec", "pandas", "scikit-learn")))
print("cuda:", torch.cuda.is_available() and torch.cuda.get_device_name(), torch.version.cuda)
PY
# datasets 5.1+ needs pyarrow>=24; where the machine's is older, the bundle's 5.0 (pyarrow>=21) goes instead
wheels=$(ls $B/wheels/*.whl)
if ! "$PY" -c 'import sys, pyarrow; sys.exit(int(pyarrow.__version__.split(".")[0]) < 24)'; then
  wheels="$(ls $B/wheels/*.whl | grep -v /datasets-) $(ls $B/wheels/pyarrow-before-24/*.whl)"
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $wheels
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rc=0
"$PY" scripts/gpu_check.py --data-dir $B/data --minilm $B/minilm-bf16 --smollm $B/smollm2 \
  --out "$OUT_DIR/gpu_check.md" --work "$OUT_DIR/work" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log" || rc=$?
# the small files only: logs and records, no weights
(cd "$OUT_DIR/work" && find . \( -name '*.txt' -o -name '*.log' -o -name '*.json' -o -name '*.yaml' \) -print0 |
  tar czf ../gpu_check_logs.tgz --null -T -) && rm -rf "$OUT_DIR/work"
exit $rc
