#!/usr/bin/env bash
# GPU work on an offline machine that has torch, transformers, peft and accelerate but not this project's venv,
# from the bundle `make gpu-bundle` writes. Copy the repo with .gpu_bundle/ over, then in its root:
#   bash scripts/gpu_offline.sh check OUT_DIR [gpu_check.py arguments]
#       `make gpu-check`: OUT_DIR/gpu_check.md, gpu_check.log and gpu_check_logs.tgz (each case's log and record)
#   DEADLINE=480 WORKERS=12 bash scripts/gpu_offline.sh grid OUT_DIR
#       the converged comparison (experiment=paper_full_gpu, scripts/paper_full.sh) with WORKERS runs sharing the
#       GPU until DEADLINE seconds have passed; the runs still going are then stopped (their checkpoints stay on
#       that machine). Every completed record of the experiment goes into OUT_DIR/records.tgz, every
#       PACK_EVERY seconds (60) as well, so a lease that ends first still returns what finished: unpack it in the
#       repo root here and commit the metrics.json files. Unpack it before calling again, even on a warm machine:
#       each call gets this tree afresh, and runs whose records it lacks are trained again. 12 workers kept an
#       H200 at 90-99% (0.04-0.06 s a step each, ~250 steps a second in all; results/paper_full/PLAN.md).
#   DEADLINE=240 WORKERS=6 ABLATION=paper_full_gpu_budget bash scripts/gpu_offline.sh ablation OUT_DIR
#       the same for a sparse ablation (`sparsetune paper --stage ablation`) at the lrs sparse chose in
#       EXPERIMENT's grid; its records go into the same OUT_DIR/records.tgz
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: bash scripts/gpu_offline.sh check|grid|ablation OUT_DIR [gpu_check.py arguments]}
OUT_DIR=${2:?usage: bash scripts/gpu_offline.sh check|grid|ablation OUT_DIR [gpu_check.py arguments]}
shift 2
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
  wheels="$(echo "$wheels" | grep -v /datasets-) $(ls $B/wheels/pyarrow-before-24/*.whl)"
fi
# SKIP_INSTALL=1: a python that has them already (a rehearsal here with PYTHON=.venv/bin/python)
[ "${SKIP_INSTALL:-0}" = 1 ] ||
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $wheels
[ -d "$B/data" ] || { mkdir -p "$B/data" && tar xzf "$B/data.tgz" -C "$B/data"; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
  TOKENIZERS_PARALLELISM=false SPARSETUNE_DATA_DIR="$(realpath "$B/data")"
rc=0
case "$MODE" in
  check)
    "$PY" scripts/gpu_check.py --data-dir "$B/data" --minilm "$B/minilm-bf16" --smollm "$B/smollm2" \
      --out "$OUT_DIR/gpu_check.md" --work "$OUT_DIR/work" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log" || rc=$?
    # the small files only: logs and records, no weights
    (cd "$OUT_DIR/work" && find . \( -name '*.txt' -o -name '*.log' -o -name '*.json' -o -name '*.yaml' \) -print0 |
      tar czf ../gpu_check_logs.tgz --null -T -) && rm -rf "$OUT_DIR/work" ;;
  grid|ablation)
    # timeout signals the whole process group: every run saves an interrupted record, as on Ctrl-C
    EXPERIMENT=${EXPERIMENT:-paper_full_gpu}   # a rehearsal on a CPU: EXPERIMENT=paper_smoke OUTPUT_ROOT=DIR
                                               # SKIP_INSTALL=1 PYTHON=.venv/bin/python
    pack() {   # the finished records so far (completed or diverged: both final) and the log's end; renamed into
               # place, so a kill mid-pack (the lease can end before DEADLINE) leaves the last whole archive
      { find "${OUTPUT_ROOT:-results}/runs" -name metrics.json \( -path "*experiment=$EXPERIMENT,*" \
          -o -path "*experiment=${ABLATION:-$EXPERIMENT},*" \) -print0 |
        xargs -0 -r grep -lE '"status": "(completed|diverged)"' || true; } | tar czf "$OUT_DIR/records.part" -T - &&
        mv -f "$OUT_DIR/records.part" "$OUT_DIR/records.tgz"
      tail -c 2000000 /tmp/grid.log > "$OUT_DIR/grid.part" && mv -f "$OUT_DIR/grid.part" "$OUT_DIR/grid.log"
    }
    rm -f /tmp/grid.done
    (t=0; while [ ! -e /tmp/grid.done ]; do sleep 1; (( ++t % ${PACK_EVERY:-60} )) || pack; done) & packer=$!
    if [ "$MODE" = grid ]; then
      # CORE (paper_full.sh's: sparse, full, lora) passes through: CORE=sparse,full,lora,sparse_all adds that row
      SPARSETUNE="$PY -m sparsetune_cli.cli" EXPERIMENT=$EXPERIMENT OUT=results/$EXPERIMENT \
        CORE_ONLY=${CORE_ONLY:-1} WORKERS=${WORKERS:-6} \
        timeout -s TERM "${DEADLINE:-480}" bash scripts/paper_full.sh > /tmp/grid.log 2>&1 || rc=$?
    else   # the sparse ablation ABLATION at the lrs sparse chose in EXPERIMENT's grid, WORKERS runs at once
      timeout -s TERM "${DEADLINE:-480}" "$PY" -m sparsetune_cli.cli paper --experiment "$EXPERIMENT" \
        --ablation "${ABLATION:?ablation needs ABLATION=an experiment config}" --study none --stage ablation \
        ${OUTPUT_ROOT:+"output_root=$OUTPUT_ROOT"} train.threads=1 hydra/launcher=joblib \
        "hydra.launcher.n_jobs=${WORKERS:-6}" > /tmp/grid.log 2>&1 || rc=$?
    fi
    [ $rc = 124 ] && rc=0   # the deadline, not a failure
    touch /tmp/grid.done; wait $packer; pack   # the packer's last pack ends before this one begins
    echo "grid: $(tar tzf "$OUT_DIR/records.tgz" | wc -l) finished records in $OUT_DIR/records.tgz (rc $rc)"
    grep -a "Error\|error:" /tmp/grid.log | tail -5 || true ;;
  *) echo "unknown mode $MODE: check, grid or ablation" >&2; exit 2 ;;
esac
exit $rc
