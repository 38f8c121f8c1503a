"""`sparsetune` command line: run (a Hydra app), tokens, table, predict, merge."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import CONFIG_DIR, apply_task_overrides, compose, validate_config
from .errors import UserError

COMMANDS = ("run", "paper", "tokens", "table", "predict", "merge")
USAGE = """usage: sparsetune COMMAND [ARGS]

commands:
  run [KEY=VALUE ...]        train and evaluate one run (Hydra; -m sweeps), e.g.
                             sparsetune run task=banking77 method=full train.epochs=2 seed=3
  paper [--stage S] [...]    run the paper grid (each method at its best lr) and write results/paper/
  tokens [KEY=VALUE ...]     print a task's token-group report without training
  table DIR [DIR ...]        compare finished runs (Markdown table + CSV)
  predict RUN_DIR [TEXT ...] label texts with a finished run (stdin when no TEXT)
  merge RUN_DIR OUT_DIR      write a sparse or LoRA run as a plain Hugging Face model folder

`sparsetune run --help` lists the config groups and their options.
"""

def _fail(message: str) -> None:
    print(f"sparsetune: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    command, rest = argv[0], argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if command == "run":
            _hydra_run(rest)
        elif command == "paper":
            _paper(rest)
        elif command == "tokens":
            _tokens(rest)
        elif command == "table":
            _table(rest)
        elif command == "predict":
            _predict(rest)
        elif command == "merge":
            _merge(rest)
    except UserError as e:
        _fail(str(e))


def _hydra_run(args: list[str]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from .record import finished_run, usable_cpus

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
    def app(cfg):
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        if hc.mode.name == "MULTIRUN" and "joblib" in hc.launcher._target_.lower():
            pin_gpu(hc.job.num)
            if cfg.train.threads is None:   # torch's default (every core) in each job oversubscribes the CPU
                cfg.train.threads = thread_share(hc.launcher.get("n_jobs"), usable_cpus())
        try:
            cfg = apply_task_overrides(cfg, hc.overrides.task)
            validate_config(cfg)
            # before importing torch: a resumed sweep skips in seconds
            record = finished_run(cfg, run_dir, lambda: data_fingerprint(cfg), lambda: option_defaults(cfg))
            if record is None:
                from .callbacks import StopOnSignal
                from .train import run
                record = run(cfg, run_dir)
                if StopOnSignal.received is not None and record.status == "completed":
                    sys.exit(130)   # stopped during the run's last passes: it completed, the sweep stops here
            if record.status == "diverged":
                raise UserError(f"the run diverged: {record.error} (its record stays in {run_dir}; force=true "
                                "reruns it)")
        except UserError as e:
            if hc.mode.name == "MULTIRUN":  # one bad job must not stop the sweep
                logging.getLogger("sparsetune").error("%s: %s", run_dir, e)
                return None
            _fail(str(e))
        except Exception:
            if hc.mode.name == "MULTIRUN":
                logging.getLogger("sparsetune").exception("run failed: %s", run_dir)
                return None
            raise
        if record.status == "interrupted":
            sys.exit(130)
        return record.headline() if record.metrics else None

    sys.argv = ["sparsetune run"] + args
    app()


def option_defaults(cfg) -> dict:   # imports torch: asked for only by a record that predates a method key
    from .methods import get_method
    return get_method(cfg.method).option_defaults()


def data_fingerprint(cfg) -> str:
    from .data import load_task
    return load_task(cfg.task, cfg.data_dir, cfg.seed).fingerprint


def visible_gpus() -> list[str]:
    """GPU ids without starting CUDA: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import shutil
    import subprocess
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def pin_gpu(job_num: int) -> None:
    """Parallel jobs (joblib) on a machine with several GPUs: one GPU per worker process, chosen by the job
    number, set before CUDA starts (otherwise every job would use all GPUs through DataParallel)."""
    import torch
    gpus = visible_gpus()
    if len(gpus) > 1 and not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[job_num % len(gpus)]


def thread_share(n_jobs: int | None, cpus: int) -> int:
    """CPU threads for each of n_jobs parallel jobs, n_jobs as joblib reads it (None: 1, -1: a job per core,
    -2: all cores but one)."""
    jobs = 1 if n_jobs is None else cpus + 1 + n_jobs if n_jobs < 0 else n_jobs
    return max(1, cpus // max(1, min(jobs, cpus)))


def _paper(args: list[str]) -> None:
    from . import sweep
    from .report import write_tables
    p = argparse.ArgumentParser(prog="sparsetune paper", description=sweep.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("all",) + sweep.STAGES + ("status",), default="all")
    p.add_argument("--experiment", default="paper_cpu", help="the main grid (configs/experiment/)")
    p.add_argument("--ablation", default="paper_ablation_cpu",
                   help="the sparse ablations, comma-separated (tables: ablation.md for the first, "
                        "ablation_NAME.md for each further one); 'none' to skip")
    p.add_argument("--study", default="paper_selector_cpu,paper_selector_head_cpu,paper_selector_readout_cpu,"
                                      "paper_selector_even_cpu,paper_selector_depth_cpu,paper_selector_columns_cpu,"
                                      "paper_selector_1pct_cpu,paper_selector_embeddings_cpu,"
                                      "paper_selector_depth1_cpu,paper_selector_matched_cpu",
                   help="the selector study's experiments, comma-separated (tables only); 'none' to skip")
    p.add_argument("--out", default="results/paper", help="folder for tables and plots")
    p.add_argument("--lr-extend", type=int, default=2, metavar="N",
                   help="widen a grid by up to N lr steps past an end that scores best (0: the lr_grid only)")
    p.add_argument("overrides", nargs="*", help="hydra options (e.g. hydra/launcher=joblib), backbone, output_root")
    a = p.parse_args(args)
    plan = sweep.Plan(a.experiment, a.overrides, a.lr_extend)
    if a.stage == "status":
        print(status_text(sweep.progress(plan), plan.experiment))
        return
    ablations = [] if a.ablation == "none" else [sweep.Plan(name, a.overrides) for name in a.ablation.split(",")]
    study = [] if a.study == "none" else [sweep.Plan(name, a.overrides) for name in a.study.split(",")]
    stages = sweep.STAGES if a.stage == "all" else (a.stage,)
    try:
        if "grid" in stages:
            sweep.run_grid(plan)
        if "seeds" in stages:
            sweep.run_seeds(plan)
        for ablation in ablations if "ablation" in stages else []:
            sweep.run_ablation(plan, ablation)
    except KeyboardInterrupt:
        raise UserError("interrupted: finished runs are kept; rerun the same command to resume") from None
    if "tables" in stages:
        for path in write_tables(plan, ablations, Path(a.out), study):
            print(f"wrote {path}")


def status_text(rows: list[dict], experiment: str) -> str:
    import pandas as pd
    from .report import markdown
    df = pd.DataFrame(rows)
    known = df["hours to go"].notna()
    return (f"experiment={experiment}: {df['runs to go'].sum()} runs to go (at least), "
            f"{df['hours spent'].sum():.1f} training hours spent, about {df.loc[known, 'hours to go'].sum():.1f} to go "
            f"in the {known.sum()} cells with a finished run ({(~known).sum()} cells have none to estimate from)\n\n"
            + markdown(df, index=False, missing="?"))


def _tokens(args: list[str]) -> None:
    from .tokens import token_report
    cfg = compose(args)
    print(token_report(cfg)["markdown"])


def _table(args: list[str]) -> None:
    p = argparse.ArgumentParser(prog="sparsetune table", description="Compare finished runs: mean ± std over seeds.")
    p.add_argument("dirs", nargs="+", help="folders searched recursively for metrics.json")
    p.add_argument("--metric", default="headline", help="headline (each task's own), accuracy, macro_f1, f1, "
                   "or any flattened key such as cost.train_seconds")
    p.add_argument("--split", default="test", choices=["test", "validation"])
    p.add_argument("--rows", default="method", help="grouping for rows (method, backbone, task, variant)")
    p.add_argument("--cols", default="task", help="grouping for columns")
    p.add_argument("--csv", default=None, help="CSV path (default: comparison.csv in the first DIR)")
    a = p.parse_args(args)
    from .record import collect
    from .report import comparison_table
    records = collect(a.dirs)
    if not records:
        raise UserError(f"no completed runs (metrics.json with status completed) under {', '.join(a.dirs)}")
    try:
        display, stats = comparison_table(records, a.metric, a.split, a.rows, a.cols)
    except (ValueError, KeyError) as e:
        raise UserError(str(e)) from None
    print(f"{a.split} {a.metric}: mean ± std over seeds ({len(records)} runs)\n")
    print(display.to_markdown())
    out = Path(a.csv) if a.csv else Path(a.dirs[0]) / "comparison.csv"
    stats.to_csv(out, index=False)
    print(f"\nwrote {out}")


def _predict(args: list[str]) -> None:
    p = argparse.ArgumentParser(prog="sparsetune predict", description="Label texts with a finished run.")
    p.add_argument("run_dir")
    p.add_argument("texts", nargs="*", help="inputs; a pair task takes 'text_a<TAB>text_b'; none: one per stdin line")
    p.add_argument("--json", action="store_true", help="one JSON object per input with label probabilities")
    p.add_argument("--top", type=int, default=3, help="how many probabilities to show with --json")
    a = p.parse_args(args)
    from .predict import format_predictions, load_run, predict
    texts = a.texts or stdin_lines()
    runner = load_run(Path(a.run_dir))
    for line in format_predictions(runner, predict(runner, texts), texts, as_json=a.json, top=a.top):
        print(line)


def _merge(args: list[str]) -> None:
    p = argparse.ArgumentParser(prog="sparsetune merge", description="Write a run as a plain Hugging Face model.")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it already holds files")
    a = p.parse_args(args)
    from .predict import load_run, merge
    out = Path(a.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give merge a folder to write the model into")
    if out.is_dir() and any(out.iterdir()) and not a.force:
        raise UserError(f"{out} already holds files; pass --force to replace its contents, or choose a new folder")
    merge(load_run(Path(a.run_dir)), out)
    print(f"wrote {out}")


def stdin_lines() -> list[str]:
    """Non-empty input lines from stdin; bytes that are not UTF-8 are named by line."""
    lines = []
    for lineno, raw in enumerate(sys.stdin.buffer, 1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise UserError(f"stdin:{lineno}: not UTF-8; give predict UTF-8 text") from None
        if line.strip():
            lines.append(line)
    return lines


if __name__ == "__main__":
    main()
