"""`sparsetune paper`: run the paper grid fairly, then regenerate every table and plot from the runs.

Stages (each resumable: completed runs are skipped, interrupted ones resume):
  grid      every task x method at seed 0, once per learning rate in the method's lr_grid
  seeds     every task x method at the lr that won on validation in the grid, for all seeds
  ablation  the sparse ablation sweep, at sparse's chosen lr for each task
  tables    results/paper/: Markdown + CSV tables and PNG plots from the runs' metrics.json
"""
from __future__ import annotations

import logging
import math
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError
from .results import collect, flatten

log = logging.getLogger(__name__)
STAGES = ("grid", "seeds", "ablation", "tables")


def fmt_lr(lr: float) -> str:
    """One spelling of a learning rate, so the grid and seeds stages name the same run folders."""
    return f"{float(lr):g}"


class Plan:
    """What an experiment config sweeps, and where its runs live."""

    def __init__(self, experiment: str, overrides: list[str], lr_extend: int = 2):
        from .cli import compose
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

    def records(self, task: str, method: str, extra: str | None = None) -> list[dict]:
        """Completed runs of this experiment; `extra` keeps only one lr, e.g. 'method.lr=0.001'."""
        prefix = f"experiment={self.experiment},"
        return [r for r in collect([self.runs / task / self.backbone / method])
                if r["variant"].startswith(prefix) and (extra is None or extra in r["variant"].split(","))]


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
    from .cli import compose
    return [float(v) for v in compose([f"method={method}"]).method.lr_grid]


def headline(rec: dict, split: str = "validation") -> float:
    return rec["metrics"][split][rec["headline_metric"]]


def lr_step(lr: float, up: bool) -> float:
    """The next learning rate along the 1-3-10 series that the lr grids use (1e-3 -> 3e-3 -> 1e-2)."""
    exp = math.floor(math.log10(lr) + 1e-9)
    mantissa = 1 if lr / 10 ** exp < 2 else 3
    factor = {(1, True): 3, (3, True): 10, (1, False): 0.3, (3, False): 1}[mantissa, up]
    return float(f"{factor * 10 ** exp:.3g}")


def lr_cell(plan: Plan, task: str, method: str, extend: int) -> tuple[dict[str, dict], list[float]]:
    """The seed-0 runs of one (task, method) grid, by lr, and the lrs still to run. The grid is the method's
    lr_grid, widened by up to `extend` steps past an end while the end is strictly the best point: a best
    score at the edge means a wider grid may do better. Ties stay put, so a method that learns nothing at
    any lr does not walk off."""
    grid = sorted(lr_grid(method))
    runs = {fmt_lr(r["config"]["method"]["lr"]): r for r in plan.records(task, method) if r["seed"] == 0}
    missing = [lr for lr in grid if fmt_lr(lr) not in runs]
    if missing:
        return {}, missing
    steps = {True: 0, False: 0}
    while True:
        scores = {lr: headline(runs[fmt_lr(lr)]) for lr in grid}
        best = max(scores.values())
        for up, end, inner in ((True, grid[-1], grid[-2]), (False, grid[0], grid[1])):
            if len(grid) > 1 and scores[end] == best > scores[inner] and steps[up] < extend:
                nxt = lr_step(end, up)
                if fmt_lr(nxt) not in runs:
                    return {}, [nxt]
                grid = sorted([*grid, nxt])
                steps[up] += 1
                break   # widened: look at both ends again
        else:   # neither end needs widening
            return {fmt_lr(lr): runs[fmt_lr(lr)] for lr in grid}, []


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
            best = max(runs.values(), key=lambda r: (headline(r), -r["config"]["method"]["lr"]))
            chosen[task, method] = best["config"]["method"]["lr"]
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
    chosen, _ = lr_choices(plan, ["sparse"])
    for task in ablation.tasks:
        if (task, "sparse") not in chosen:
            raise UserError(f"sparse has no chosen lr for {task} in experiment={plan.experiment} (its grid is "
                            "missing or unfinished), so the ablation cannot run there")
        launch([f"experiment={ablation.experiment}", f"task={task}", f"method.lr={fmt_lr(chosen[task, 'sparse'])}",
                *ablation.overrides])


def main_records(plan: Plan) -> list[dict]:
    """Every seed of every (task, method) at its chosen lr, for the cells whose grid is finished."""
    chosen, _ = lr_choices(plan)
    return [r for (task, method), lr in chosen.items() for r in plan.records(task, method, f"method.lr={fmt_lr(lr)}")]


# ---- tables and plots -------------------------------------------------------------------------------------

def frame(records: list[dict]) -> pd.DataFrame:
    """One row per run with the test/validation headline, the lr and the sparse ablation settings."""
    rows = []
    for r in records:
        row = flatten(r)
        m = r["config"]["method"]
        row.update(lr=m["lr"], selector=m.get("selector"), budget=m.get("budget"),
                   threads=str(r["config"]["train"].get("threads")),
                   test=headline(r, "test"), validation=headline(r, "validation"),
                   best_validation=max([h[r["headline_metric"]] for h in r.get("history", [])] or [np.nan]))
        rows.append(row)
    return pd.DataFrame(rows)


def mean_std(values: pd.Series) -> str:
    return f"{values.mean():.4f} ± {values.std():.4f} (n={len(values)})" if len(values) > 1 else \
        f"{values.mean():.4f} (n=1)"


def main_table(df: pd.DataFrame, tasks: list[str], methods: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """task x method, mean ± std over seeds of the test headline metric, plus the average over tasks."""
    stats = df.groupby(["method", "task"])["test"].agg(["mean", "std", "count"]).reset_index()
    cells = df.groupby(["method", "task"])["test"].apply(mean_std).unstack("task")
    cells = cells.reindex(index=[m for m in methods if m in cells.index],
                          columns=[t for t in tasks if t in cells.columns])
    means = stats.pivot(index="method", columns="task", values="mean")
    cells["average"] = [f"{means.loc[m].mean():.4f}" if means.loc[m].notna().sum() == len(tasks) else "(incomplete)"
                        for m in cells.index]
    return cells.fillna(""), stats


def lr_table(plan: Plan, chosen: dict) -> pd.DataFrame:
    """The learning-rate grid: seed-0 validation score of every grid point (the widened grid once a cell is
    finished), the choice and whether it sits on an end of the grid (then a wider grid might do better)."""
    rows = []
    for task in plan.tasks:
        for method in plan.methods:
            runs, todo = lr_cell(plan, task, method, plan.lr_extend)
            if todo:   # unfinished: show what has run of the method's own grid
                grid = {fmt_lr(lr) for lr in lr_grid(method)}
                runs = {fmt_lr(r["config"]["method"]["lr"]): r for r in plan.records(task, method)
                        if r["seed"] == 0 and fmt_lr(r["config"]["method"]["lr"]) in grid}
            ends = {min(runs, key=float), max(runs, key=float)} if runs else set()
            pick = chosen.get((task, method))
            for lr, r in sorted(runs.items(), key=lambda kv: float(kv[0])):
                rows.append({"task": task, "method": method, "lr": float(lr), "validation": headline(r),
                             "test": headline(r, "test"), "chosen": pick is not None and fmt_lr(pick) == lr,
                             "edge": lr in ends})
    return pd.DataFrame(rows)


def cost_table(df: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per method: costs as ratios to full finetuning on the same task and seed, then averaged; sizes as medians.
    Only runs with the same train.threads pair up: the parallel launcher runs jobs at 1 thread each, 1.5-1.8x
    slower per run than one job alone, so a ratio across the two settings measures the launcher, not the method."""
    full = df[df.method == "full"].set_index(["task", "seed", "threads"])
    rows = []
    for method in [m for m in methods if m in set(df.method)]:
        sub = df[df.method == method]
        row = {"method": method, "runs": len(sub),
               "trainable params": int(sub["cost.trainable_params"].median()),
               "trainable params without head": int(sub["cost.trainable_params_without_head"].median())}
        paired = sub.join(full, on=["task", "seed", "threads"], rsuffix="_full", how="inner")
        row["runs paired with full"] = len(paired)
        for key, name in (("cost.train_seconds", "train time ÷ full"), ("cost.wall_seconds", "whole run ÷ full")):
            if key in paired and f"{key}_full" in paired:
                row[name] = round(float((paired[key] / paired[f"{key}_full"]).mean()), 3)
        reached = [time_to_reach(r, f) for r, f in zip(paired["run_dir"], paired["run_dir_full"])]
        got = [x for x in reached if x is not None]
        row["time to full's best validation ÷ full"] = (
            f"{np.median(got):.2f} ({len(got)}/{len(reached)} reached)" if got else f"not reached (0/{len(reached)})")
        row["peak RSS MB (process)"] = round(float(sub["cost.peak_memory_mb"].median()))
        row["saved model MB"] = round(float(sub["cost.checkpoint_mb"].median()), 1)
        rows.append(row)
    return pd.DataFrame(rows)


def time_to_reach(run_dir: str, full_dir: str) -> float | None:
    """Seconds (from the start of the command) until this run's validation score first reached full finetuning's
    best, as a ratio to the time full finetuning took to reach it; None if it never did."""
    from .results import read_metrics
    run, full = read_metrics(Path(run_dir)), read_metrics(Path(full_dir))
    key = full["headline_metric"]
    hist_full = [h for h in full.get("history", []) if h.get("seconds") is not None]
    hist = [h for h in run.get("history", []) if h.get("seconds") is not None]
    if not hist_full or not hist:
        return None
    best = max(hist_full, key=lambda h: h[key])
    first = next((h for h in hist if h[key] >= best[key]), None)
    return None if first is None else first["seconds"] / best["seconds"]


def ablation_table(df: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    cells = df.groupby(["budget", "selector", "task"])["test"].apply(mean_std).unstack("task")
    return cells.reindex(columns=[t for t in tasks if t in cells.columns]).fillna("").reset_index()


def token_case_study(plan: Plan, per_class: int = 3, classes: int = 6, top: int = 10) -> str:
    """Per task: the top token groups overall and for a few classes, mined as a sparse run would."""
    from .cli import compose
    from .tokens import token_report
    lines = ["# Token groups per task", "",
             "Mined from each task's training sample exactly as `method=sparse` does (`sparsetune tokens task=NAME` "
             "prints the full report).", ""]
    for task in plan.tasks:
        rep = token_report(compose([f"experiment={plan.experiment}", f"task={task}", "method=sparse",
                                    *[o for o in plan.overrides if not o.startswith("hydra")]]))
        lines += [f"## {task}", "", "Top groups: " + ", ".join(f"'{e['group']}' ({e['class']})"
                                                                for e in rep["groups"][:top]), "",
                  "| class | top groups (z-score) |", "|---|---|"]
        for name, entries in list(rep["per_class"].items())[:classes]:
            lines.append(f"| {name} | " + ", ".join(f"{e['group']} ({e['score']:.1f})" for e in entries[:per_class])
                         + " |")
        lines.append("")
    return "\n".join(lines)


def plots(df: pd.DataFrame, cost: pd.DataFrame, tasks: list[str], methods: list[str], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = df.groupby(["method", "task"])["test"].mean().unstack("task")
    complete = means.dropna()   # the average over tasks only for methods with every task
    avg = complete.mean(axis=1)
    cost = cost.set_index("method")
    written = []
    for x_key, fname, xlabel, logx in (
            ("trainable params", "metric_vs_params.png", "trainable parameters (with head, log scale)", True),
            ("train time ÷ full", "metric_vs_time.png", "training time ÷ full finetuning", False)):
        if x_key not in cost or avg.empty:
            continue
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for m in avg.index:
            ax.scatter(cost.loc[m, x_key], avg[m], s=50, color="C3" if m == "sparse" else "C0")
            ax.annotate(m, (cost.loc[m, x_key], avg[m]), textcoords="offset points", xytext=(5, 4), fontsize=9)
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test headline metric, mean over {complete.shape[1]} tasks")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(out / fname)

    present = [t for t in tasks if t in set(df.task)]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 3.6), squeeze=False, sharey=False)
        order = [m for m in methods if m in set(df.method)]
        for ax, task in zip(axes[0], present):
            for i, m in enumerate(order):
                vals = df[(df.task == task) & (df.method == m)]["test"]
                ax.scatter([i] * len(vals), vals, s=14, color="C3" if m == "sparse" else "C0", alpha=0.8)
                if len(vals):
                    ax.hlines(vals.mean(), i - 0.3, i + 0.3, color="k", lw=1)
            ax.set_xticks(range(len(order)), order, rotation=60, fontsize=8)
            ax.set_title(task, fontsize=10)
            ax.grid(alpha=0.3, axis="y")
        axes[0][0].set_ylabel("test headline metric per seed")
        fig.tight_layout()
        fig.savefig(out / "seed_spread.png", dpi=120)
        plt.close(fig)
        written.append(out / "seed_spread.png")
    return written


def write_tables(plan: Plan, ablation: Plan | None, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    chosen, missing = lr_choices(plan)
    records = main_records(plan)
    if not records:
        raise UserError(f"no completed runs of experiment={plan.experiment} under {plan.runs}: "
                        "run `sparsetune paper` (or --stage grid) first")
    df = frame(records)
    written = []

    def save(name: str, table: pd.DataFrame, title: str, note: str = "", index: bool = True) -> None:
        table.to_csv(out / f"{name}.csv", index=index)
        (out / f"{name}.md").write_text(f"# {title}\n\n{note}\n\n{table.to_markdown(index=index)}\n")
        written.extend([out / f"{name}.md", out / f"{name}.csv"])

    cells, _ = main_table(df, plan.tasks, plan.methods)
    status = (f"Grid not finished for: {', '.join(missing)}." if missing else "Every grid cell is finished.")
    save("main", cells, f"Test headline metric, experiment={plan.experiment} ({plan.backbone})",
         f"Mean ± std over seeds (n = seeds finished), each method at its learning rate chosen on validation "
         f"(seed 0) from its lr_grid; see lr_grid.md. Headline: accuracy, F1 of the match class for "
         f"entity_matching. {status}")
    grid = lr_table(plan, chosen)
    save("lr_grid", grid, "Learning-rate grid (seed 0)",
         "validation and test headline metric per grid point; `chosen` is the best validation score, "
         "`edge` marks the ends of the grid searched. A grid is widened one lr step at a time past an end "
         "that scores strictly best, up to --lr-extend steps per side.", index=False)
    cost = cost_table(df, plan.methods)
    save("cost", cost, "Cost (ratios to full finetuning on the same task, seed and train.threads, averaged)",
         "Times are wall-clock on this machine. `whole run` covers loading, token mining, probe, training and "
         "evaluation; `time to full's best validation` is when a run first matched full finetuning's best "
         "validation score, counted from the start of the command. Peak RSS is the whole process (on the CPU "
         "model loading dominates it; scripts/bench.py measures training memory alone).", index=False)
    if ablation is not None:
        abl = [r for task in ablation.tasks for r in ablation.records(task, "sparse")]
        if abl:
            save("ablation", ablation_table(frame(abl), ablation.tasks),
                 f"Sparse ablation, experiment={ablation.experiment}: test headline metric",
                 "Rows: how many rows train (budget, fraction of backbone parameters) and which (selector: token "
                 "= token-driven gradient, the default).", index=False)
    (out / "tokens.md").write_text(token_case_study(plan))
    written.append(out / "tokens.md")
    written += plots(df, cost, plan.tasks, plan.methods, out)
    return written


def main(args: list[str]) -> None:
    import argparse
    p = argparse.ArgumentParser(prog="sparsetune paper", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("all",) + STAGES, default="all")
    p.add_argument("--experiment", default="paper_cpu", help="the main grid (configs/experiment/)")
    p.add_argument("--ablation", default="paper_ablation_cpu", help="the sparse ablation; 'none' to skip")
    p.add_argument("--out", default="results/paper", help="folder for tables and plots")
    p.add_argument("--lr-extend", type=int, default=2, metavar="N",
                   help="widen a grid by up to N lr steps past an end that scores best (0: the lr_grid only)")
    p.add_argument("overrides", nargs="*", help="hydra options (e.g. hydra/launcher=joblib), backbone, output_root")
    a = p.parse_args(args)
    plan = Plan(a.experiment, a.overrides, a.lr_extend)
    ablation = None if a.ablation == "none" else Plan(a.ablation, a.overrides)
    stages = STAGES if a.stage == "all" else (a.stage,)
    try:
        if "grid" in stages:
            run_grid(plan)
        if "seeds" in stages:
            run_seeds(plan)
        if "ablation" in stages and ablation is not None:
            run_ablation(plan, ablation)
    except KeyboardInterrupt:
        raise UserError("interrupted: finished runs are kept; rerun the same command to resume") from None
    if "tables" in stages:
        for path in write_tables(plan, ablation, Path(a.out)):
            print(f"wrote {path}")
