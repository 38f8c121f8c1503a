#!/usr/bin/env bash
# The selector study, seed by seed (every task, budget and selector of one seed before the next), 1 thread per
# job: a stopped study leaves complete paired seeds. WORKERS processes (default 2) take each seed's tasks in
# opposite orders; each run folder's lock keeps two of them off the same run. Resumable: run it again.
# STUDY=paper_selector_{head,readout,even,depth,columns,1pct,embeddings,depth1,matched}_cpu for the study's other
# parts; SEEDS and TASKS narrow it.
# Tables: make tables (results/paper/selector_study.md).
set -u
BIN=${BIN:-.venv/bin}
STUDY=${STUDY:-paper_selector_cpu}
WORKERS=${WORKERS:-2}
SEEDS=${SEEDS:-0 1 2 3 4}
experiment_tasks() {   # a part may run on some tasks only (paper_selector_1pct_cpu: srl and trec)
  "$BIN/python" -c "import sys; from sparsetune_cli.sweep import Plan
print(','.join(Plan(sys.argv[1], []).tasks))" "$1"
}
TASKS=${TASKS:-$(experiment_tasks "$STUDY")} || exit   # the experiment's own tasks unless TASKS narrows them
source "$(dirname "$0")/workers.sh"
worker() {  # $1: worker number
  for seed in $SEEDS; do
    "$BIN/sparsetune" paper --stage ablation --ablation "$STUDY" ${OUTPUT_ROOT:+"output_root=$OUTPUT_ROOT"} \
      train.threads=1 "hydra.sweeper.params.seed=$seed" "hydra.sweeper.params.task='${ORDERS[$(($1 % 2))]}'" \
      || return $?
  done
}
run_workers   # a failed worker fails the script, as the one-worker loop did
