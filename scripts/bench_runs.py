"""Whole runs, back to back, as ratios to one full-finetuning run on the same task and seed (`make bench-runs`).

    full            all of the task's training data, --epochs epochs (no cache: every block trains)
    sparse          the same, from a fresh frozen-bottom cache: its build is in this run's time
    sparse lr grid  --lrs more sparse runs that reuse that cache (a sweep's learning-rate points)
    layer_select, head_only   with train.frozen_dropout=false, each building its own cache

Runs go one at a time with nothing else started by this script, in a fresh datasets cache (so the first
sparse run pays for the cache). Writes results/bench_runs.{json,md}; the runs' folders go to a temporary
folder. About 45 minutes on 2 CPU cores for banking77 at 3 epochs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(name: str, overrides: list[str], root: Path, env: dict) -> dict:
    folder = root / "".join(c if c.isalnum() else "_" for c in name)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sparsetune_cli.cli", "run", f"output_root={folder}",
                           "train.progress=false", *overrides], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rec = json.loads(next(folder.rglob("metrics.json")).read_text())
    cost = rec["cost"]
    row = {"run": name, "wall_seconds": wall, "train_seconds": cost["train_seconds"],
           "seconds_per_step": cost["seconds_per_step"], "steps": cost["steps"],
           "cached_blocks": cost.get("cached_blocks", 0), "cache_built": cost.get("cache_built", False),
           "cache_seconds": cost.get("cache_seconds", 0.0), "test": rec["metrics"]["test"][rec["headline_metric"]],
           "validation": rec["metrics"]["validation"][rec["headline_metric"]]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="banking77")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lrs", default="0.001,0.01,0.03",
                   help="the sparse grid's other points (sparse's own lr runs first)")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every run (e.g. task.train_limit=2000)")
    p.add_argument("--out", default=str(REPO / "results" / "bench_runs"))
    p.add_argument("--render", action="store_true",
                   help="only rewrite OUT.md from the existing OUT.json (after a change of format); runs nothing")
    a = p.parse_args()
    out = Path(a.out)
    if a.render:
        result = json.loads(out.with_suffix(".json").read_text())
    else:
        result = measure(a)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    page = render(result)
    out.with_suffix(".md").write_text(page)
    print(page)


def measure(a: argparse.Namespace) -> dict:
    """Every run of the benchmark, one after another, with the ratios to the first (full finetuning)."""
    root = Path(tempfile.mkdtemp(prefix="bench-runs-"))
    env = {**os.environ, "HF_DATASETS_CACHE": str(root / "datasets-cache"), "TOKENIZERS_PARALLELISM": "false"}
    common = [f"task={a.task}", f"train.epochs={a.epochs}", f"seed={a.seed}", *a.extra]
    rows = [run("full", ["method=full", *common], root, env),
            run("sparse", ["method=sparse", *common], root, env)]
    rows += [run(f"sparse lr={lr}", ["method=sparse", f"method.lr={lr}", *common], root, env)
             for lr in a.lrs.split(",") if lr]
    rows += [run(m, [f"method={m}", "train.frozen_dropout=false", *common], root, env)
             for m in ("layer_select", "head_only")]
    full = rows[0]
    for r in rows:
        r["wall ÷ full"] = r["wall_seconds"] / full["wall_seconds"]
        r["step ÷ full"] = r["seconds_per_step"] / full["seconds_per_step"]
    grid = [r for r in rows if r["run"].startswith("sparse")]
    summary = {"sparse lr grid (all points, one cache) ÷ one full run":
               sum(r["wall_seconds"] for r in grid) / full["wall_seconds"], "grid points": len(grid)}
    return {"settings": vars(a), "command": " ".join(["python scripts/bench_runs.py", *sys.argv[1:]]),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_average_at_end": os.getloadavg()},
            "runs": rows, "summary": summary}


def render(result: dict) -> str:
    """The markdown page of a bench_runs result, each column at one precision (seconds to 0.1, ratios and scores
    to 0.001), so that `--render` can rewrite it from the json without running anything."""
    import pandas as pd
    from sparsetune_cli.report import markdown
    table = pd.DataFrame(result["runs"]).set_index("run")
    cols = ["wall_seconds", "wall ÷ full", "seconds_per_step", "step ÷ full", "steps", "cached_blocks",
            "cache_built", "cache_seconds", "validation", "test"]
    table = table[cols].round({"wall_seconds": 1, "cache_seconds": 1, "wall ÷ full": 3, "seconds_per_step": 3,
                               "step ÷ full": 3, "validation": 3, "test": 3})
    s, m = result["settings"], result["machine"]
    return (f"# Whole runs as ratios to full finetuning ({s['task']}, {s['epochs']} epochs, seed {s['seed']})\n\n"
            f"Command: `{result.get('command', 'python scripts/bench_runs.py')}`, runs one after another on "
            f"{m['cpus']} CPUs with nothing else started by the script (load average at the end "
            f"{tuple(round(x, 2) for x in m['load_average_at_end'])}). `wall` is the whole command: loading, "
            f"tokenizing, mining and probe, the cache (built in the first sparse run, reused by the grid), training, "
            f"evaluation.\n\n{markdown(table, index=True)}\n\n"
            + "\n".join(f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}"
                        for k, v in result["summary"].items()) + "\n")


if __name__ == "__main__":
    main()
