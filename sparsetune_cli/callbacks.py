"""Trainer callbacks, one job each: the CSV log, stopping on a signal, stopping on a non-finite loss, per-step
reseeding, and the clock behind each evaluation's time."""
from __future__ import annotations

import csv
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)


class CsvLogger(TrainerCallback):
    """Every logged value as a row (step, epoch, key, value) in log.csv; long format never needs a header rewrite.
    A resumed run first drops the rows logged after its checkpoint (a run killed without a checkpoint logged
    them), so every step appears once."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= state.global_step]
        if len(kept) != len(rows):
            log.info("log.csv: dropped %d rows logged after step %d, where this run resumes",
                     len(rows) - len(kept), state.global_step)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerows(kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "epoch", "key", "value"])
            for k, v in logs.items():
                w.writerow([state.global_step, state.epoch, k, v])


class StopOnSignal(TrainerCallback):
    """SIGTERM/SIGINT: save a checkpoint at the end of this step, then stop (a second signal stops at once).
    `received` stays set for the process: a signal that lands after training (in the test pass) lets that run
    complete, and the sweep it belongs to stops before the next run."""
    received: int | None = None

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        log.warning("received %s: saving a checkpoint, then stopping (send again to stop at once)",
                    signal.Signals(signum).name)
        self.signal = StopOnSignal.received = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        # The Trainer ends a stopped epoch as a finished one, evaluating mid-epoch. That score would
        # enter the history and the best-checkpoint choice, which an uninterrupted run never sees.
        if self.signal is not None and abs(state.epoch - round(state.epoch)) > 1e-6:
            control.should_evaluate = False

    @staticmethod
    def restore_default_handlers():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)


class StopOnNonFiniteLoss(TrainerCallback):
    def __init__(self):
        self.reason: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self.reason = f"loss became {loss} at step {state.global_step}; lower method.lr or check the data"
            control.should_training_stop = True


class ReseedEachStep(TrainerCallback):
    """Dropout randomness is a function of (seed, step), not of the process history, so a run resumed mid-epoch
    draws the same masks as an uninterrupted one (Trainer's own RNG restore lands a few draws off)."""

    def __init__(self, seed: int):
        self.seed = seed
        self._calls = (-1, 0)  # (global step, micro-batch index within it)

    def on_step_begin(self, args, state, control, **kwargs):
        step, i = self._calls
        self._calls = (state.global_step, i + 1 if step == state.global_step else 0)
        torch.manual_seed((self.seed * 1_000_003 + state.global_step) * 64 + self._calls[1])


class EvalClock(TrainerCallback):
    """Stamps each evaluation in the Trainer's log history with the seconds since the command started, counted
    across stops: a resumed run adds its time to what its checkpoint's history already held. The history is
    saved in every checkpoint, so the stamps survive any stop, SIGKILL included. It also stamps the machine's
    1-minute load average, so a run's cost says how busy the CPU was (other jobs of a sweep, tests, ...)."""
    KEY = "elapsed_seconds"
    LOAD_KEY = "load_1m"

    def __init__(self, start: float):
        self.start = start
        self.offset = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        stamped = [e[self.KEY] for e in state.log_history if self.KEY in e]
        self.offset = stamped[-1] if stamped else 0.0

    def on_evaluate(self, args, state, control, **kwargs):
        entry = next((e for e in reversed(state.log_history) if any(k.startswith("eval_") for k in e)), None)
        if entry is not None:
            entry[self.KEY] = self.offset + time.perf_counter() - self.start
            entry[self.LOAD_KEY] = round(os.getloadavg()[0], 2)
