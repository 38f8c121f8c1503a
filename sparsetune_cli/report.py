"""Reports: tables and plots from finished runs' records (`sparsetune table`, `sparsetune paper --stage tables`).

Aggregation only: every number comes from a metrics.json read through record.RunRecord.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .config import ADDED_KEYS
from .errors import UserError
from .record import RunRecord, mean_std, read_record
from .sweep import Plan, fmt_lr, lr_cell, lr_choices, main_records


def flatten(rec: RunRecord) -> dict:
    """One flat row per run: identity, every split's metrics and every cost figure."""
    row = {"task": rec.task, "backbone": rec.backbone, "method": rec.method, "seed": rec.seed,
           "run_dir": rec.run_dir, "variant": rec.variant}
    for split, metrics in (rec.metrics or {}).items():
        for k, v in metrics.items():
            row[f"{split}.{k}"] = v
    for k, v in (rec.cost or {}).items():
        row[f"cost.{k}"] = v
    row["headline"] = rec.headline_metric
    return row


def comparison_table(records: list[RunRecord], metric: str = "headline", split: str = "test",
                     rows: str = "method", cols: str = "task"):
    """mean ± std over seeds of one metric; rows x cols (e.g. method x task). Returns (display, numbers)."""
    if not records:
        raise ValueError("no completed runs found")
    df = pd.DataFrame([flatten(r) for r in records])
    if metric == "headline":
        df["value"] = [r[f"{split}.{h}"] if f"{split}.{h}" in r else np.nan for r, h in
                       zip(df.to_dict("records"), df["headline"])]
    else:
        key = metric if "." in metric else f"{split}.{metric}"
        if key not in df:
            raise ValueError(f"no metric {key!r} in the runs; available: {', '.join(c for c in df if '.' in c)}")
        df["value"] = df[key]
    stats = df.groupby([rows, cols])["value"].agg(["mean", "std", "count"]).reset_index()
    counts = metric != "headline" and bool(df["value"].dropna().map(lambda v: float(v).is_integer()).all())

    whole = "{:,.0f}"   # counts and sizes as whole numbers, scores with 4 decimals
    cell = stats.apply(lambda s: mean_std(s["mean"], s["std"], s["count"],
                                          whole if counts or abs(s["mean"]) >= 1000 else "{:.4f}"), axis=1)
    display = stats.assign(cell=cell).pivot(index=rows, columns=cols, values="cell").fillna("")
    return display, stats


def frame(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run with the test/validation headline, the lr and what its method groups it by (sparse: the
    selector, budget, depth and granularity)."""
    from .methods import METHODS   # imports torch: only tables need it here
    rows = []
    for r in records:
        m = r.config["method"]
        row = {**flatten(r), **(METHODS[m["name"]].describe(m) if m["name"] in METHODS else {})}
        row.update(lr=m["lr"], threads=str(r.config["train"].get("threads")),
                   test=r.headline("test"), validation=r.headline("validation"))
        rows.append(row)
    return pd.DataFrame(rows)


def over_seeds(values: pd.Series) -> str:
    return mean_std(values.mean(), values.std(), len(values))


def main_table(df: pd.DataFrame, tasks: list[str], methods: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """task x method, mean ± std over seeds of the test headline metric, plus the average over tasks."""
    stats = df.groupby(["method", "task"])["test"].agg(["mean", "std", "count"]).reset_index()
    cells = df.groupby(["method", "task"])["test"].apply(over_seeds).unstack("task")
    cells = cells.reindex(index=[m for m in methods if m in cells.index],
                          columns=[t for t in tasks if t in cells.columns])
    means = stats.pivot(index="method", columns="task", values="mean")
    cells["average"] = [f"{means.loc[m].mean():.4f}" if means.loc[m].notna().sum() == len(tasks) else "(incomplete)"
                        for m in cells.index]
    return cells.fillna(""), stats


def lr_table(plan: Plan, chosen: dict) -> pd.DataFrame:
    """The learning-rate grid: seed-0 validation score of every grid point that has run (an unfinished cell
    shows the grid walked so far, widened points included), the choice and whether the point sits on an end of
    the grid searched so far (then a wider grid might do better)."""
    rows = []
    for task in plan.tasks:
        for method in plan.methods:
            runs, _ = lr_cell(plan, task, method, plan.lr_extend)
            ends = {min(runs, key=float), max(runs, key=float)} if runs else set()
            pick = chosen.get((task, method))
            for lr, r in sorted(runs.items(), key=lambda kv: float(kv[0])):
                scored = r.status == "completed"   # a diverged run has no scores: nan in the table
                rows.append({"task": task, "method": method, "lr": float(lr),
                             "validation": r.headline() if scored else math.nan,
                             "test": r.headline("test") if scored else math.nan,
                             "chosen": pick is not None and fmt_lr(pick) == lr,
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
        paired = sub.join(full, on=["task", "seed", "threads"], suffixes=("", "_full"), how="inner")
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
    run, full = read_record(Path(run_dir)), read_record(Path(full_dir))
    key = full.headline_metric
    hist_full = [h for h in full.history or [] if h.get("seconds") is not None]
    hist = [h for h in run.history or [] if h.get("seconds") is not None]
    if not hist_full or not hist:
        return None
    best = max(hist_full, key=lambda h: h[key])
    first = next((h for h in hist if h[key] >= best[key]), None)
    return None if first is None else first["seconds"] / best["seconds"]


def ablation_table(df: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    # rows: budget and selector always, depth where the ablation varies it (the selector ablation pins it);
    # per task the test score over seeds and, beside it, the validation mean (what a choice is made on)
    axes = ["budget", *(["depth"] if df["depth"].nunique() > 1 else []), "selector"]
    # and the lr where a cell ran at more than one (a setting tried at another lr than sparse's chosen one): its
    # runs are other settings, not more seeds
    if df.groupby([*axes, "task"])["lr"].nunique().max() > 1:
        axes.append("lr")
    groups = df.groupby([*axes, "task"])
    test = groups["test"].apply(over_seeds).unstack("task")
    val = groups["validation"].mean().map(lambda v: "" if pd.isna(v) else f"{v:.4f}").unstack("task")
    cells = pd.DataFrame(index=test.index)
    for task in [t for t in tasks if t in test.columns]:
        cells[task], cells[f"{task} val"] = test[task], val[task]
    return cells.fillna("").reset_index()


def stability_table(df: pd.DataFrame, tasks: list[str], methods: list[str]) -> pd.DataFrame:
    """Per method and task: the seed spread of the test headline (std, worst seed, best - worst). A method is more
    stable when its std and its mean - worst gap are smaller."""
    rows = []
    for method in [m for m in methods if m in set(df.method)]:
        for task in [t for t in tasks if t in set(df.task)]:
            v = df[(df.method == method) & (df.task == task)]["test"]
            if len(v):
                rows.append({"method": method, "task": task, "seeds": len(v), "mean": round(v.mean(), 4),
                             "std": round(v.std(), 4) if len(v) > 1 else np.nan, "worst seed": round(v.min(), 4),
                             "mean - worst": round(v.mean() - v.min(), 4), "best - worst": round(v.max() - v.min(), 4)})
    return pd.DataFrame(rows)


def convergence_table(records: list[RunRecord]) -> pd.DataFrame:
    """Per run at its chosen lr: whether its validation curve had flattened when it stopped: its best evaluation is
    not the last one, or its last two evaluations differ by under 0.5 points."""
    rows = []
    for r in records:
        curve = [h[r.headline_metric] for h in r.history or []]
        if not curve:
            continue
        best = int(np.argmax(curve))
        last_two = abs(curve[-1] - curve[-2]) if len(curve) > 1 else np.nan
        rows.append({"task": r.task, "method": r.method, "seed": r.seed, "lr": r.config["method"]["lr"],
                     "evaluations": len(curve), "best at": best + 1, "best": round(curve[best], 4),
                     "last": round(curve[-1], 4), "last two differ by": round(last_two, 4),
                     "flattened": bool(best < len(curve) - 1 or last_two < 0.005)})
    return pd.DataFrame(rows).sort_values(["task", "method", "seed"]) if rows else pd.DataFrame()


def data_table(records: list[RunRecord]) -> pd.DataFrame:
    """Per task: max_length, split sizes and the share of each split truncated, as the runs recorded them."""
    rows = {}
    for r in records:
        data = r.data or {}
        if r.task in rows or not data.get("sizes"):
            continue
        row = {"task": r.task, "max_length": r.config["task"]["max_length"]}
        for split, n in data["sizes"].items():
            row[split] = n
            row[f"{split} truncated"] = f"{100 * data.get('truncated', {}).get(split, 0) / max(n, 1):.2f}%"
        rows[r.task] = row
    return pd.DataFrame(list(rows.values()))


TOKEN_DRIVEN = ("token", "token_fisher", "token_contrastive", "token_x_weight")
CONTROLS = ("random", "magnitude")


def token_driven(selector: str) -> bool:
    return selector.split("+")[0] in TOKEN_DRIVEN   # token_fisher+head64 too


def control_of(selector: str, control: str, present) -> str:
    """The control a selector is paired with: an allocation=even variant's is the control of the same allocation
    (when it ran), so that only the rows within each matrix differ."""
    even = f"{control}+even"
    return even if selector.endswith("+even") and even in present else control


def paired_text(a: pd.Series, b: pd.Series) -> tuple[str, float, int]:
    """paired_difference as the table writes it: (text, low end of the interval, pairs)."""
    mean, low, high, n = paired_difference(a, b)
    return (f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] (n={n})" if n > 1 else
            f"{mean:+.4f} (n=1, no interval)" if n == 1 else ""), low, n


def paired_difference(a: pd.Series, b: pd.Series) -> tuple[float, float, float, int]:
    """Mean of a - b over the seeds both have, with a 95% t interval: (mean, low, high, n)."""
    from scipy import stats
    d = (a - b).dropna()
    n = len(d)
    if n < 2:
        return (float(d.mean()) if n else np.nan), np.nan, np.nan, n
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half), n


def selector_study(df: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """Per task, budget, depth and granularity: each selector's test mean over seeds and, for the token-driven
    ones, the paired difference (same seed: same training sample, data order and head) against random and against
    magnitude, with its 95% interval (`paired seeds`: the fewer seeds of the two pairings). `beats both`: both
    intervals lie above 0. `vs random, its matrices` (and magnitude): against random rows in the matrices its probe
    fills, as many in each (allocation=probe), where that ran: whether the rows matter beyond the matrices."""
    rows = []
    for (task, budget, depth, gran), cell in df.groupby(["task", "budget", "depth", "granularity"]):
        test = cell.pivot_table(index="seed", columns="selector", values="test")
        val = cell.pivot_table(index="seed", columns="selector", values="validation")
        for sel in test.columns:
            row = {"task": task, "budget": budget, "depth": depth, "granularity": gran, "selector": sel,
                   "seeds": int(test[sel].notna().sum()), "test": round(test[sel].mean(), 4),
                   "validation": round(val[sel].mean(), 4)}
            wins, paired = [], []
            for name in CONTROLS:
                row[f"vs {name}"] = ""
                control = control_of(sel, name, test.columns)
                if token_driven(sel) and control in test.columns:
                    row[f"vs {name}"], low, n = paired_text(test[sel], test[control])
                    wins.append(n > 1 and bool(low > 0))
                    paired.append(n)
            row["paired seeds"] = min(paired) if paired else np.nan
            row["beats both"] = len(wins) == len(CONTROLS) and all(wins)
            for name in CONTROLS:   # token+head64 -> random+head64+probe: the same probe chose the matrices
                matched = name + sel[len(sel.split("+")[0]):] + "+probe"
                row[f"vs {name}, its matrices"] = ""
                if token_driven(sel) and matched in test.columns:
                    row[f"vs {name}, its matrices"] = paired_text(test[sel], test[matched])[0]
            rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["task"] = pd.Categorical(out["task"], [t for t in tasks if t in set(out["task"])] +
                                 sorted(set(out["task"]) - set(tasks)))
    return out.sort_values(["task", "depth", "granularity", "budget", "selector"]).reset_index(drop=True)


def selector_verdict(study: pd.DataFrame, min_tasks: int = 3, min_seeds: int = 5) -> tuple[pd.DataFrame, str, str]:
    """The issue's rule for the default selector, from selector_study's table. A token-driven selector that beats
    both random and magnitude, over at least `min_seeds` paired seeds, on at least `min_tasks` tasks at one setting
    (budget, depth, granularity) becomes the default, at that setting; of several such (selector, setting) pairs,
    the one with the best mean validation score there, over the tasks every winning setting ran. Failing that, the
    selector with the best mean validation score over the main part's cells does: depth 2, rows, the (task,
    budget) cells where both controls ran at as many seeds, at the budgets where they ran on every task. A
    selector is ranked once it has run every such cell at the controls' seeds, so a variant run at one budget, or
    still running, never shrinks the cells the others are ranked on. Returns (per-selector table, default, why)."""
    main = study[(study.depth == "2") & (study.granularity == "rows")]
    runs = main[main.selector.isin(CONTROLS)]
    controls = runs.groupby(["task", "budget"], observed=True).seeds
    control_seeds = controls.min()[(controls.nunique() == 1) & (controls.count() == len(CONTROLS))]
    # a budget the controls ran on some tasks only (e.g. 1% on srl and trec) would unrank every selector that did
    # not run it: such a budget is judged by the rule above but not ranked on
    control_seeds = control_seeds[control_seeds.groupby(level="budget").transform("size") == runs.task.nunique()]
    cells = main.join(control_seeds.rename("control seeds"), on=["task", "budget"], how="inner")
    cells = cells[cells.seeds == cells["control seeds"]]
    complete = cells.groupby("selector").task.transform("size") == len(control_seeds)
    common = cells[complete]   # the ranked selectors, each over every main cell
    rows, counts = [], {}
    for sel, runs in study.groupby("selector"):
        won = runs[runs["beats both"] & (runs["paired seeds"] >= min_seeds)]
        for setting, tasks in won.groupby(["budget", "depth", "granularity"]).task:
            counts[(sel, *setting)] = tasks.nunique()
        mine = common[common.selector == sel]
        rows.append({"selector": sel, "main cells": len(mine),
                     "mean validation": round(mine.validation.mean(), 4) if len(mine) else np.nan,
                     "mean test": round(mine.test.mean(), 4) if len(mine) else np.nan,
                     f"beats both, {min_seeds}+ seeds (task budget depth granularity)": "; ".join(
                         f"{r.task} {100 * r.budget:g}% {r.depth} {r.granularity}" for r in won.itertuples())})
    table = pd.DataFrame(rows).sort_values("mean validation", ascending=False, na_position="last")
    if table.empty:
        return table, "", "no runs"
    best = max(counts.items(), key=lambda kv: kv[1], default=(None, 0))
    won = [k for k, n in counts.items() if n >= min_tasks]
    if won:   # several (selector, setting) pairs meet the rule: the best mean validation at its setting, over the
        # tasks every winning setting ran (a setting run on more tasks is not favoured for its easier ones)
        ran = {k: study[(study.selector == k[0]) & (study.budget == k[1]) & (study.depth == k[2])
                        & (study.granularity == k[3])].set_index("task").validation for k in won}
        shared = set.intersection(*(set(v.index) for v in ran.values()))
        score = {k: v[v.index.isin(shared)].mean() if shared else v.mean() for k, v in ran.items()}
        won.sort(key=lambda k: (-score[k], k))
        sel, budget, depth, gran = won[0]
        also = "".join(f"; {k[0]} at {100 * k[1]:g}%, depth {k[2]}, {k[3]} too" for k in won[1:])
        also += ", with a lower mean validation" if won[1:] else ""
        return table, sel, (f"{sel} beats random and magnitude (95% intervals above 0, {min_seeds}+ seeds) on "
                            f"{counts[won[0]]} tasks at {100 * budget:g}%, depth {depth}, {gran} (mean validation "
                            f"{score[won[0]]:.4f}){also}")
    top = table.iloc[0]
    if not top["main cells"]:
        return table, "", "no main cell has random and magnitude at as many seeds yet"
    most = (f"at most {best[1]} task{'s' if best[1] != 1 else ''}, {best[0][0]}" if best[0] else
            "on no task at all")
    return table, top.selector, (f"no token-driven selector beats random and magnitude with {min_seeds}+ seeds on "
                                 f"{min_tasks} tasks at any setting ({most}); {top.selector} has the best mean "
                                 f"validation score over the {int(top['main cells'])} main cells "
                                 f"({top['mean validation']:.4f})")


def selector_plot(df: pd.DataFrame, tasks: list[str], out: Path) -> Path | None:
    """Paired difference against random (95% interval; a bare point while a cell has one seed) by budget, one line
    per selector, one panel per task that has random runs (depth 2, rows: the main part of the study); an
    allocation=even variant against random+even."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    main = df[(df.depth == "2") & (df.granularity == "rows")]
    present = [t for t in tasks if {"random"} < set(main[main.task == t].selector)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.6), squeeze=False, sharey=True)
    selectors = sorted((s for s in set(main.selector) if token_driven(s)),
                       key=lambda s: (TOKEN_DRIVEN.index(s.split("+")[0]), s))
    selectors += ["magnitude"] if "magnitude" in set(main.selector) else []
    # token red, magnitude gray; the rest from tab20 without its reds and grays
    others = itertools.cycle(plt.cm.tab20(i) for i in (0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 16, 17, 18, 19))
    colors = {s: "C3" if s == "token" else "0.45" if s == "magnitude" else next(others) for s in selectors}
    for ax, task in zip(axes[0], present):
        cell = main[main.task == task]
        budgets = sorted(set(cell.budget))
        for i, sel in enumerate(selectors):
            xs, ys, lo, hi = [], [], [], []
            for budget, b in cell.groupby("budget"):
                t = b.pivot_table(index="seed", columns="selector", values="test")
                control = control_of(sel, "random", t.columns)
                if sel in t and control in t:
                    mean, low, high, n = paired_difference(t[sel], t[control])
                    if n >= 1:   # one seed: a point without an interval
                        xs.append(budget * (1 + 0.05 * (i - len(selectors) / 2)))   # side by side
                        ys.append(mean)
                        lo.append(0.0 if n < 2 else mean - low)
                        hi.append(0.0 if n < 2 else high - mean)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=3, capsize=2, lw=1, label=sel, color=colors[sel])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{100 * b:g}%" for b in budgets])
        ax.minorticks_off()
        n = cell.groupby(["budget", "selector"]).seed.nunique()
        ax.set_title(f"{task} ({n.min()}-{n.max()} seeds a cell)" if n.min() != n.max() else
                     f"{task} ({n.min()} seeds a cell)", fontsize=10)
        ax.set_xlabel("budget (share of backbone parameters)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test: selector - random (paired, 95% CI)")
    labels = {}   # every panel's lines: the probe variants ran on some tasks only
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    fig.legend([labels[s] for s in selectors if s in labels], [s for s in selectors if s in labels], fontsize=7,
               loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(out / "selector_study.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out / "selector_study.png"


def token_case_study(plan: Plan, per_class: int = 3, classes: int = 6, top: int = 10) -> str:
    """Per task: the top token groups overall and for a few classes, as the seed-0 sparse run saved them
    (token_groups.json), or mined the same way where that file is not kept (committed records hold only
    metrics.json)."""
    lines = ["# Token groups per task", "",
             "Mined from each task's training sample exactly as `method=sparse` does (`sparsetune tokens task=NAME` "
             "prints the full report).", ""]
    for task in plan.tasks:
        rep = saved_token_groups(plan, task) or mine_token_groups(plan, task)
        lines += [f"## {task}", "", "Top groups: " + ", ".join(f"'{e['group']}' ({e['class']})"
                                                                for e in rep["groups"][:top]), "",
                  "| class | top groups (z-score) |", "|---|---|"]
        for name, entries in list(rep["per_class"].items())[:classes]:
            lines.append(f"| {name} | " + ", ".join(f"{e['group']} ({e['score']:.1f})" for e in entries[:per_class])
                         + " |")
        lines.append("")
    return "\n".join(lines)


def saved_token_groups(plan: Plan, task: str) -> dict | None:
    for r in plan.records(task, "sparse"):
        path = Path(r.run_dir) / "token_groups.json"
        if r.seed == 0 and path.is_file():
            return json.loads(path.read_text())
    return None


def mine_token_groups(plan: Plan, task: str) -> dict:
    from .config import compose
    from .tokens import token_report
    return token_report(compose([f"experiment={plan.tokens_from}", f"task={task}", "method=sparse",
                                 *[o for o in plan.overrides if not o.startswith("hydra")]]))


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


SETTINGS = {"lr", "budget"}   # columns of settings keep their shortest form (0.0003, 0.01)


def markdown(table: pd.DataFrame, index: bool, missing: str = "") -> str:
    """The table in markdown, each measured float column at one number of decimals (at most 4), a missing value
    as `missing`. tabulate's default "g" drops trailing zeros, so 0.8000 printed as 0.8 beside 0.8507. The csv
    keeps every digit."""
    def fmt(name, col: pd.Series) -> str:
        if col.dtype.kind != "f" or name in SETTINGS:
            return "g"
        places = max((len(f"{v:.4f}".rstrip("0").split(".")[1]) for v in col.dropna() if math.isfinite(v)),
                     default=0)
        return f".{places}f"
    fmts = ([fmt(table.index.name, table.index.to_series())] if index else []) + [
        fmt(name, table.iloc[:, i]) for i, name in enumerate(table.columns)]
    shown = table.astype(object).where(table.notna(), None)   # tabulate prints a NaN float as "nan"
    return shown.to_markdown(index=index, floatfmt=fmts, missingval=missing)


def write_tables(plan: Plan, ablations: list[Plan], out: Path, study: list[Plan] | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    chosen, missing = lr_choices(plan)
    records = main_records(plan)
    grid = lr_table(plan, chosen)
    if not records and grid.empty:
        raise UserError(f"no completed runs of experiment={plan.experiment} under {plan.runs}: "
                        "run `sparsetune paper` (or --stage grid) first")
    written = []

    def save(name: str, table: pd.DataFrame, title: str, note: str = "", index: bool = True) -> None:
        table.to_csv(out / f"{name}.csv", index=index)
        (out / f"{name}.md").write_text(f"# {title}\n\n{note}\n\n{markdown(table, index)}\n")
        written.extend([out / f"{name}.md", out / f"{name}.csv"])

    status = (f"Grid not finished for: {', '.join(missing)}." if missing else "Every grid cell is finished.")
    title = f"Test headline metric, experiment={plan.experiment} ({plan.backbone})"
    if not records:   # the grids are still running: show what has run
        (out / "main.md").write_text(f"# {title}\n\nNo (task, method) learning-rate grid is finished yet; "
                                     f"lr_grid.md shows the runs so far. {status}\n")
        written.append(out / "main.md")
    else:
        df = frame(records)
        cells, _ = main_table(df, plan.tasks, plan.methods)
        save("main", cells, title,
             f"Mean ± std over seeds (n = seeds finished), each method at its learning rate chosen on validation "
             f"(seed 0) from its lr_grid; see lr_grid.md. Headline: accuracy, F1 of the match class for "
             f"entity_matching. {status}")
    save("lr_grid", grid, "Learning-rate grid (seed 0)",
         "validation and test headline metric per grid point; `chosen` is the best validation score, "
         "`edge` marks the ends of the grid searched. A grid is widened one lr step at a time past an end "
         "that scores strictly best, up to --lr-extend steps per side." +
         (" nan: the run diverged (its training loss became non-finite), the worst point of its grid."
          if not grid.empty and grid.validation.isna().any() else ""), index=False)
    if not records:
        return written
    cost = cost_table(df, plan.methods)
    save("cost", cost, "Cost (ratios to full finetuning on the same task, seed and train.threads, averaged)",
         "Times are wall-clock on this machine. `whole run` covers loading, token mining, probe, training and "
         "evaluation; `time to full's best validation` is when a run first matched full finetuning's best "
         "validation score, counted from the start of the command. Peak RSS is the whole process (on the CPU "
         "model loading dominates it; scripts/bench.py measures training memory alone).", index=False)
    for i, ablation in enumerate(ablations):   # ablation.md, then ablation_NAME.md for each further one
        abl = [r for task in ablation.tasks for r in ablation.records(task, "sparse")]
        if abl:
            save("ablation" if i == 0 else f"ablation_{ablation.experiment}",
                 ablation_table(frame(abl), ablation.tasks),
                 f"Sparse ablation, experiment={ablation.experiment}: headline metric, test and validation",
                 "Rows: how many rows train (budget, fraction of backbone parameters), where (depth: the top "
                 "blocks that get rows, where it varies) and which (selector: token = token-driven gradient, the "
                 "default), and the lr where a setting ran at more than one. Per task: the test score (mean ± std "
                 "over seeds) and the validation mean (`val`).",
                 index=False)
    runs = [r for p in study or [] for task in p.tasks for r in p.records(task, "sparse")]
    if runs:
        tasks = list(dict.fromkeys(t for p in study for t in p.tasks))
        sdf = frame(runs)
        study_table = selector_study(sdf, tasks)
        save("selector_study", study_table,
             f"Selector study, experiment={', '.join(p.experiment for p in study)}: which rows to train",
             "Test headline metric, mean over seeds, per task, budget (fraction of backbone parameters), depth "
             "(top blocks; auto: chosen by the probe) and granularity. `vs random` / `vs magnitude`: the mean "
             "paired difference (same seed: same training sample, data order and head) with its 95% t interval. "
             "An allocation=even variant is paired with the controls of the same allocation. `beats both`: both "
             "intervals lie above 0. `vs random, its matrices` (and magnitude): against random (magnitude) rows "
             "in the matrices the selector's probe fills, as many in each (allocation=probe), where that ran. "
             "Validation means are what a default is chosen on.",
             index=False)
        verdict, default, why = selector_verdict(study_table)
        save("selector_verdict", verdict, "Selector study: which selector the evidence makes the default",
             "The issue's rule: a token-driven selector that beats random and magnitude (paired 95% intervals "
             "above 0, 5 or more seeds) on 3 tasks at one setting becomes the default (of several, the one with "
             "the best mean validation at its setting); else the best mean validation score over the main cells "
             "does. `main cells`: the (task, budget) cells at depth 2, rows where random and magnitude ran at as "
             "many seeds, at budgets run on every task; a selector is ranked by its means over them once it has "
             "run every one at those seeds (0: not ranked, e.g. a variant run at one budget, or still running)."
             f"\n\n**Default by the rule: {default}**: {why}.", index=False)
        fig = selector_plot(sdf, tasks, out)
        written.extend([fig] if fig else [])
    stab = stability_table(df, plan.tasks, plan.methods)
    save("stability", stab, "Stability over seeds (test headline metric, each method at its chosen lr)",
         "`std`: sample std over seeds; `mean - worst`: how far the worst seed falls below the mean."
         + data_order_note(records), index=False)
    conv = convergence_table(records)
    if not conv.empty:
        save("convergence", conv, "Did each run's validation curve flatten?",
             "Per run at its chosen lr: evaluations done (early stopping may end a run before train.epochs), the "
             "best one, and `flattened`: the best is not the last evaluation, or the last two differ by under 0.5 "
             "points.", index=False)
    save("data", data_table(records), "Data each task's runs used",
         "Examples per split and the share truncated at the task's max_length (from the runs' records).",
         index=False)
    (out / "tokens.md").write_text(token_case_study(plan))
    written.append(out / "tokens.md")
    written += plots(df, cost, plan.tasks, plan.methods, out)
    written += stability_plot(stab, plan.tasks, out)
    return written


def data_order_note(records: list[RunRecord]) -> str:
    """What the seeds' data orders have in common, when they share them (train.data_order=epoch_offset)."""
    orders = {r.config.get("train", {}).get("data_order", ADDED_KEYS["train.data_order"]) for r in records}
    if "epoch_offset" not in orders:
        return ""
    return (" The seeds shuffle with `train.data_order=epoch_offset`: seed s's epoch e has seed 0's epoch s + e "
            "order, so they share most data orders and differ in head initialization, dropout and sparse's probe "
            "(README, `train.data_order`).")


def stability_plot(stab: pd.DataFrame, tasks: list[str], out: Path) -> list[Path]:
    """Left: each method's seed std per task; right: each method's worst seed below its mean, averaged over tasks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if stab.empty or stab["std"].isna().all():
        return []
    methods = list(dict.fromkeys(stab.method))
    present = [t for t in tasks if t in set(stab.task)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        sub = stab[stab.method == m].set_index("task").reindex(present)
        left.bar(np.arange(len(present)) + i * width, sub["std"], width, label=m,
                 color="C3" if m == "sparse" else f"C{i + (i >= 3)}")   # C3 (red) is sparse's alone
    left.set_xticks(np.arange(len(present)) + 0.4 - width / 2, present, fontsize=8)
    left.set_ylabel("seed std of the test metric")
    left.legend(fontsize=7, ncol=2)
    gap = stab.groupby("method", sort=False)["mean - worst"].mean().reindex(methods)
    right.bar(range(len(methods)), gap, color=["C3" if m == "sparse" else "C0" for m in methods])
    right.set_xticks(range(len(methods)), methods, rotation=60, fontsize=8)
    right.set_ylabel("mean - worst seed, averaged over tasks")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "stability.png", dpi=120)
    plt.close(fig)
    return [out / "stability.png"]


