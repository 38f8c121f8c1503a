"""Sweeps: run an experiment's grid fairly, each method at its own learning rate (`sparsetune paper`).

Stages (each resumable: completed runs are skipped, interrupted ones resume):
  grid      every task x method at seed 0, once per learning rate in the method's lr_grid
  seeds     every task x method at the lr that won on validation in the grid, for all seeds
  ablation  the sparse ablation sweep, at sparse's chosen lr for each task (or the ablation's own ablation_lr)
  status    where each (task, method) stands and the hours still to go; runs nothing
The tables stage is report.py's.
"""
from __future__ import annotations

import logging
import math
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from .config import compose
from .errors import UserError
from .record import CHECKPOINTS, CONFIG_FILE, FINISHED, RunRecord, checkpoint_steps, collect, read_record

log = logging.getLogger(__name__)
STAGES = ("grid", "seeds", "ablation", "tables")   # tables: report.write_tables


def fmt_lr(lr: float) -> str:
    """One spelling of a learning rate, so the grid and seeds stages name the same run folders."""
    return f"{float(lr):g}"


class Plan:
    """What an experiment config sweeps, and where its runs live."""

    def __init__(self, experiment: str, overrides: list[str], lr_extend: int = 2):
        cfg = compose([f"experiment={experiment}", *overrides], hydra=True)
        allowed = set(cfg.hydra.job.config.override_dirname.exclude_keys) - {"task", "method", "seed"}
        for o in overrides:
            key = o.split("=", 1)[0].lstrip("+~")
            if not (key.startswith("hydra") or key in allowed):
                raise UserError(f"'{o}' would change the runs of experiment={experiment}; put it in an "
                                f"experiment config (configs/experiment/) instead. Allowed here: hydra options, "
                                f"{', '.join(sorted(allowed))}")
        self.experiment, self.overrides, self.lr_extend = experiment, overrides, lr_extend
        params = {k: [v.strip() for v in str(val).split(",")] for k, val in cfg.hydra.sweeper.params.items()}
        self.tasks, self.seeds, self.methods = params["task"], params["seed"], params.get("method", ["sparse"])
        self.backbone = cfg.backbone.name
        self.runs = Path(cfg.output_root) / "runs"
        # the keys that name this experiment's own run folders: the lr and what its sweep varies. A run of the
        # experiment with more overrides (a trial with train.max_steps=1, another budget) is not a grid point
        self.grid_keys = {"experiment", "method.lr", *(set(params) - {"task", "method", "seed"})}
        # an experiment may search its own lr grid per method (lr_grids: {full: [...]}); else the method's lr_grid
        self.lr_grids = {m: [float(v) for v in grid] for m, grid in (cfg.get("lr_grids") or {}).items()}
        # an ablation may pin sparse's lr per task (ablation_lr: {srl: 0.003}), so that a later re-run of the main
        # grid, which may choose another, cannot move the runs still to come away from those they are paired with
        self.ablation_lr = {t: float(v) for t, v in (cfg.get("ablation_lr") or {}).items()}
        # the experiment whose backbone the tables' token case study tokenizes with (tokens_from: NAME), for one
        # whose weights exist only on another machine but whose tokenizer is that experiment's
        self.tokens_from = cfg.get("tokens_from") or experiment

    def lr_grid(self, method: str) -> list[float]:
        return self.lr_grids.get(method) or lr_grid(method)

    def records(self, task: str, method: str, extra: str | None = None,
                statuses: tuple[str, ...] = ("completed",), grid: bool = False) -> list[RunRecord]:
        """Runs of this experiment (completed ones unless `statuses` says); `extra` keeps only one lr, e.g.
        'method.lr=0.001'; `grid` only the runs the experiment's own sweep names (no further overrides)."""
        prefix = f"experiment={self.experiment},"
        return [r for r in collect([self.runs / task / self.backbone / method], statuses)
                if r.variant.startswith(prefix) and (extra is None or extra in r.variant.split(","))
                and (not grid or self.is_grid_variant(r.variant))]

    def is_grid_variant(self, variant: str) -> bool:
        return {part.split("=", 1)[0] for part in variant.split(",") if "=" in part} == self.grid_keys

    def run_dirs(self, task: str, method: str) -> list[Path]:
        """Every run folder of this experiment's grid in one (task, method) cell, finished or not."""
        return sorted(d for d in self.runs.glob(f"{task}/{self.backbone}/{method}/experiment={self.experiment},*/seed*")
                      if self.is_grid_variant(d.parent.name))


def launch(overrides: list[str]) -> None:
    """One Hydra multirun in a child process. Ctrl-C or SIGTERM reach the child, which checkpoints and stops;
    we wait for it, then stop too, so the same command resumes."""
    cmd = [sys.executable, "-m", "sparsetune_cli.cli", "run", "-m", *overrides]
    log.info("sparsetune run -m %s", " ".join(overrides))
    proc = subprocess.Popen(cmd)
    stopped = []   # set on a signal: stop after this child even if it then exits 0 (it was only skipping runs)

    def on_sigterm(signum, frame):
        stopped.append(signum)
        proc.send_signal(signal.SIGTERM)
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # the child got the same SIGINT and is saving a checkpoint
                stopped.append(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped or rc in (130, -signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGTERM):
        raise KeyboardInterrupt
    if rc != 0:
        raise UserError(f"the sweep stopped with exit code {rc}: sparsetune run -m {' '.join(overrides)}")


def lr_grid(method: str) -> list[float]:
    return [float(v) for v in compose([f"method={method}"]).method.lr_grid]


def lr_step(lr: float, up: bool) -> float:
    """The next learning rate along the 1-3-10 series that the lr grids use (1e-3 -> 3e-3 -> 1e-2)."""
    exp = math.floor(math.log10(lr) + 1e-9)
    mantissa = 1 if lr / 10 ** exp < 2 else 3
    factor = {(1, True): 3, (3, True): 10, (1, False): 0.3, (3, False): 1}[mantissa, up]
    return float(f"{factor * 10 ** exp:.3g}")


def grid_score(rec: RunRecord) -> float:
    """A grid point's seed-0 validation score; a diverged run's lr scores below every other."""
    return -math.inf if rec.status == "diverged" else rec.headline()


def lr_cell(plan: Plan, task: str, method: str, extend: int) -> tuple[dict[str, RunRecord], list[float]]:
    """The seed-0 runs of one (task, method) grid, by lr, and the lrs still to run (while there are some, the
    runs are the finished points of the grid walked so far). The grid is the method's lr_grid, widened by up to
    `extend` steps past an end while the end is strictly the best point: a best score at the edge means a wider
    grid may do better. Ties stay put, so a method that learns nothing at any lr does not walk off. A diverged
    run is a finished grid point, the worst."""
    grid = sorted(plan.lr_grid(method))
    runs = {fmt_lr(r.config["method"]["lr"]): r for r in plan.records(task, method, statuses=FINISHED, grid=True)
            if r.seed == 0}
    walked = lambda: {fmt_lr(lr): runs[fmt_lr(lr)] for lr in grid if fmt_lr(lr) in runs}  # noqa: E731
    missing = [lr for lr in grid if fmt_lr(lr) not in runs]
    if missing:
        return walked(), missing
    steps = {True: 0, False: 0}
    while True:
        scores = {lr: grid_score(runs[fmt_lr(lr)]) for lr in grid}
        best = max(scores.values())
        for up, end, inner in ((True, grid[-1], grid[-2]), (False, grid[0], grid[1])):
            if len(grid) > 1 and scores[end] == best > scores[inner] and steps[up] < extend:
                nxt = lr_step(end, up)
                if fmt_lr(nxt) not in runs:
                    return walked(), [nxt]
                grid = sorted([*grid, nxt])
                steps[up] += 1
                break   # widened: look at both ends again
        else:   # neither end needs widening
            return walked(), []


def best_lr(runs: dict[str, RunRecord]) -> float:
    """The lr of a finished grid with the best seed-0 validation score (ties: the smaller lr)."""
    return max(runs.values(), key=lambda r: (grid_score(r), -r.config["method"]["lr"])).config["method"]["lr"]


def lr_choices(plan: Plan, methods: list[str] | None = None) -> tuple[dict[tuple[str, str], float], list[str]]:
    """(task, method) -> the lr with the best seed-0 validation score on its (widened) grid (ties: the
    smaller lr), and the (task, method) cells whose grid is not finished yet."""
    chosen, missing = {}, []
    for task in plan.tasks:
        for method in methods or plan.methods:
            runs, todo = lr_cell(plan, task, method, plan.lr_extend)
            if todo:
                missing.append(f"{task}/{method} (lr {', '.join(fmt_lr(lr) for lr in todo)} to run)")
                continue
            chosen[task, method] = best_lr(runs)
    return chosen, missing


def run_grid(plan: Plan) -> None:
    for task in plan.tasks:  # task by task, so that finished tasks can be tabulated early
        for method in plan.methods:
            tried: set[str] = set()
            while True:   # the method's lr_grid, then one step at a time past an edge that is still the best
                _, todo = lr_cell(plan, task, method, plan.lr_extend)
                lrs = ",".join(fmt_lr(lr) for lr in todo)
                if not todo or lrs in tried:   # done, or that run failed: the seeds stage reports it
                    break
                tried.add(lrs)
                launch([f"experiment={plan.experiment}", f"task={task}", f"method={method}", f"method.lr={lrs}",
                        "seed=0", *plan.overrides])


def run_seeds(plan: Plan) -> None:
    """Every seed at the chosen lr, for each (task, method) whose grid is finished; one multirun per
    (method, lr) with every task that chose it."""
    chosen, missing = lr_choices(plan)
    by_lr: dict[tuple[str, float], list[str]] = defaultdict(list)
    for (task, method), lr in chosen.items():
        by_lr[method, lr].append(task)
    for (method, lr), tasks in by_lr.items():
        launch([f"experiment={plan.experiment}", f"task={','.join(tasks)}", f"method={method}",
                f"method.lr={fmt_lr(lr)}", f"seed={','.join(plan.seeds)}", *plan.overrides])
    if missing:
        raise UserError(f"no lr chosen yet for {', '.join(missing)} (grid runs missing or failed; see their "
                        "metrics.json): rerun `sparsetune paper` to retry them")


def run_ablation(plan: Plan, ablation: Plan) -> None:
    # the main grid's records are read only for tasks the ablation does not pin (the study pins all of its own)
    unpinned = [task for task in ablation.tasks if task not in ablation.ablation_lr]
    chosen = lr_choices(plan, ["sparse"])[0] if unpinned else {}
    for task in ablation.tasks:
        lr = ablation.ablation_lr.get(task, chosen.get((task, "sparse")))
        if lr is None:
            raise UserError(f"sparse has no chosen lr for {task} in experiment={plan.experiment} (its grid is "
                            "missing or unfinished), so the ablation cannot run there")
        launch([f"experiment={ablation.experiment}", f"task={task}", f"method.lr={fmt_lr(lr)}", *ablation.overrides])


def main_records(plan: Plan) -> list[RunRecord]:
    """Every seed of every (task, method) at its chosen lr, for the cells whose grid is finished."""
    chosen, _ = lr_choices(plan)
    return [r for (task, method), lr in chosen.items()
            for r in plan.records(task, method, f"method.lr={fmt_lr(lr)}", grid=True)]


def progress(plan: Plan) -> list[dict]:
    """Where each (task, method) cell stands, without touching a run (a status check may run beside the
    workers): grid points and seeds finished, runs started but not finished (the step of their newest
    checkpoint), the training hours spent, and the hours still to go, estimated from the cell's finished runs
    (None before one has finished). A grid still open may widen, so its runs to go are a lower bound."""
    rows = []
    for task in plan.tasks:
        for method in plan.methods:
            grid_runs, todo = lr_cell(plan, task, method, plan.lr_extend)
            lr = best_lr(grid_runs) if not todo else None
            done, started, spent = [], [], 0.0
            for run_dir in plan.run_dirs(task, method):
                rec = read_record(run_dir)
                spent += (rec.cost or {}).get("train_seconds", 0.0) if rec is not None else 0.0
                if rec is not None and rec.status in FINISHED:   # a diverged grid point is done, with no score
                    if rec.status == "completed":
                        done.append(rec)
                elif (run_dir / CONFIG_FILE).is_file():   # written when a run starts
                    started.append((run_dir, max(checkpoint_steps(run_dir / CHECKPOINTS), default=0)))
            seeds_done = [r.seed for r in done if lr is not None and fmt_lr(r.config["method"]["lr"]) == fmt_lr(lr)]
            to_go = len(todo) + len(plan.seeds) - (len(seeds_done) if lr is not None else 1)   # seed 0: a grid run
            hours_to_go, timed = None, [r.cost for r in done if (r.cost or {}).get("steps")]
            if timed:   # a finished run's time, less the steps each started run has already made
                per_run = sum(c["train_seconds"] for c in timed) / len(timed)
                per_step = per_run / (sum(c["steps"] for c in timed) / len(timed))
                hours_to_go = max(0.0, to_go * per_run - sum(step * per_step for _, step in started)) / 3600
            rows.append({"task": task, "method": method,
                         "grid": f"{len(grid_runs)} done" if not todo else
                                 f"lr {', '.join(fmt_lr(x) for x in todo)} to run",
                         "lr": fmt_lr(lr) if lr is not None else "",
                         "seeds done": f"{len(seeds_done)}/{len(plan.seeds)}",
                         "started": ", ".join(f"{d.parent.name.split(',', 1)[1]} {d.name} at step {step}"
                                              for d, step in started),
                         "runs to go": to_go, "hours spent": round(spent / 3600, 2),
                         "hours to go": None if hours_to_go is None else round(hours_to_go, 2)})
    return rows
