#!/usr/bin/env bash
# The selector study, seed by seed (every task, budget and selector of one seed before the next), 1 thread:
# a stopped study leaves complete paired seeds. Resumable: run it again. STUDY=paper_selector_depth_cpu for the
# depth and granularity part. Tables: make tables (results/paper/selector_study.md).
set -u
BIN=${BIN:-.venv/bin}
STUDY=${STUDY:-paper_selector_cpu}
for seed in 0 1 2 3 4; do
  "$BIN/sparsetune" paper --stage ablation --ablation "$STUDY" ${OUTPUT_ROOT:+"output_root=$OUTPUT_ROOT"} \
    train.threads=1 "hydra.sweeper.params.seed=$seed" || exit $?
done
