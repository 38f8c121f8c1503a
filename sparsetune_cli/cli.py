"""`sparsetune` command line: run (a Hydra app), tokens, table, predict, merge."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .errors import UserError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
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

MAX_TAG = 200   # file systems refuse names over 255 bytes


def run_tag(overrides: str) -> str:
    """A run folder name for the overrides that are not already part of the path. Scalars are spelled as
    Hydra's multirun spells them (`false` -> `False`, `1e-2` -> `0.01`), so `run` and `run -m` of one
    config find the same folder. A name too long for the file system keeps its start and ends in a hash
    of the whole."""
    tag = re.sub(r"(?<==)[^,=\[\]{}()'\"]+(?=,|$)", lambda m: _python_scalar(m.group()),
                 overrides).replace("/", "_") or "default"
    if len(tag.encode()) > MAX_TAG:
        import hashlib
        tag = tag.encode()[:MAX_TAG - 17].decode(errors="ignore") + "~" + hashlib.sha256(tag.encode()).hexdigest()[:16]
    return tag


def _python_scalar(text: str) -> str:
    if text.lower() in ("true", "false"):
        return text.capitalize()
    for kind in (int, float):
        try:
            return str(kind(text))
        except ValueError:
            pass
    return text


OmegaConf.register_new_resolver("run_tag", run_tag, replace=True)


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
            from .paper import main as paper_main
            paper_main(rest)
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

    from .results import completed_run

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
    def app(cfg):
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        if hc.mode.name == "MULTIRUN" and "joblib" in hc.launcher._target_.lower():
            pin_gpu(hc.job.num)
        try:
            record = completed_run(cfg, run_dir)   # before importing torch: a resumed sweep skips in seconds
            if record is None:
                from .train import run
                record = run(cfg, run_dir)
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
        if record.get("status") == "interrupted":
            sys.exit(130)
        return record.get("metrics", {}).get("validation", {}).get(cfg.task.headline_metric)

    sys.argv = ["sparsetune run"] + args
    app()


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


def compose(overrides: list[str], hydra: bool = False):
    """The run config without starting a run (for tokens, paper, predict and tests); hydra=True keeps the
    hydra node (sweeper params, output settings)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=hydra)


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
    from .results import collect, comparison_table
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
    texts = a.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    runner = load_run(Path(a.run_dir))
    for line in format_predictions(runner, predict(runner, texts), texts, as_json=a.json, top=a.top):
        print(line)


def _merge(args: list[str]) -> None:
    p = argparse.ArgumentParser(prog="sparsetune merge", description="Write a run as a plain Hugging Face model.")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    a = p.parse_args(args)
    from .predict import load_run, merge
    merge(load_run(Path(a.run_dir)), Path(a.out_dir))
    print(f"wrote {a.out_dir}")


if __name__ == "__main__":
    main()
