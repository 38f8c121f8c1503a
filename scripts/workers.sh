# Sourced by paper_full.sh and selector_study.sh: WORKERS processes running `worker N`, worker N taking the tasks
# in ORDERS[N % 2] (TASKS, then reversed), kept off each other's runs by the run folders' locks.
ORDERS=("$TASKS" "$(echo "$TASKS" | tr ',' '\n' | tac | paste -sd, -)")
run_workers() {   # returns non-zero when any worker failed
  trap 'trap - INT TERM; kill 0' INT TERM   # once: kill 0 signals this shell too, which would re-enter the trap
  local pids=() status=0
  for i in $(seq 0 $((WORKERS - 1))); do worker "$i" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  return $status
}
