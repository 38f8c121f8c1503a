#!/usr/bin/env bash
# The converged comparison (configs/experiment/paper_full_cpu.yaml) on a CPU: WORKERS processes (default 2) of
# `sparsetune paper`, 1 thread each, in opposite task orders. Each run folder's lock keeps two workers off the same
# run, so they share the grid without running a cell twice. The CORE methods go first (their lr grid, then every
# seed), then the experiment's other methods. Resumable: stop it any time (Ctrl-C, kill) and run it again.
#   WORKERS=2 bash scripts/paper_full.sh        (make paper-full; OUTPUT_ROOT=DIR puts the runs under DIR/runs)
# EXPERIMENT, TASKS, CORE and OUT run another experiment the same way (the tests run paper_smoke); CORE_ONLY=1 leaves
# the experiment's other methods for later (the core of every task first).
set -u
BIN=${BIN:-.venv/bin}
SPARSETUNE=${SPARSETUNE:-$BIN/sparsetune}   # or "python3 -m sparsetune_cli.cli" where there is no venv
WORKERS=${WORKERS:-2}
EXPERIMENT=${EXPERIMENT:-paper_full_cpu}
TASKS=${TASKS:-trec,intent,banking77,srl,entity_matching}
CORE=${CORE:-sparse,full,lora}
OUT=${OUT:-results/paper_full}
source "$(dirname "$0")/workers.sh"
paper() {   # $1: worker, $2: stage, $3: the methods (empty: the experiment's own list)
  $SPARSETUNE paper --experiment "$EXPERIMENT" --ablation none --study none --out "$OUT" --stage "$2" \
    ${OUTPUT_ROOT:+"output_root=$OUTPUT_ROOT"} train.threads=1 "hydra.sweeper.params.task='${ORDERS[$(($1 % 2))]}'" \
    ${3:+"hydra.sweeper.params.method='$3'"}
}
METHOD_SETS=("$CORE"); [ "${CORE_ONLY:-0}" = 1 ] || METHOD_SETS+=("")   # "": the experiment's own list
worker() {  # a second pass picks up what the first left because the other worker still held it
  for pass in 1 2; do
    for methods in "${METHOD_SETS[@]}"; do
      paper "$1" grid "$methods"
      paper "$1" seeds "$methods"
    done
  done
}
run_workers   # the tables are written whatever the workers ended with, as before
$SPARSETUNE paper --experiment "$EXPERIMENT" --ablation none --study none --out "$OUT" --stage tables \
  ${OUTPUT_ROOT:+"output_root=$OUTPUT_ROOT"} "hydra.sweeper.params.task='$TASKS'"
