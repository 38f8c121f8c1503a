"""The result record of a run (metrics.json): writing it safely, reading it back, comparing runs."""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from .errors import UserError

METRICS_FILE = "metrics.json"
# Config keys that never change a run's results (they are also left out of run folder names).
NON_RESULT_KEYS = ("output_root", "data_dir", "force", "train.logger", "train.keep_checkpoints", "train.num_workers",
                   "train.threads", "train.progress", "train.logging_steps", "method.lr_grid")
REPO_ROOT = Path(__file__).resolve().parent.parent


def classification_metrics(logits: np.ndarray, labels: np.ndarray, positive: int | None = None) -> dict:
    """accuracy, macro-F1 and, for a binary task, F1 of the positive class. Labels of -100
    (classes never seen in train) are kept and always count as wrong."""
    from sklearn.metrics import accuracy_score, f1_score
    preds = logits.argmax(-1)
    present = sorted((set(labels.tolist()) | set(preds.tolist())) - {-100})
    out = {"accuracy": float(accuracy_score(labels, preds)),
           "macro_f1": float(f1_score(labels, preds, labels=present, average="macro", zero_division=0))}
    if positive is not None:
        out["f1"] = float(f1_score(labels, preds, labels=[positive], average="macro", zero_division=0))
    return out


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metrics(run_dir: Path) -> dict | None:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys set in both configs whose values differ, leaving out keys that do not change results."""
    changes = []
    for key in old.keys() & new.keys():
        path = f"{prefix}{key}"
        if path in NON_RESULT_KEYS:
            continue
        if isinstance(old[key], dict) and isinstance(new[key], dict):
            changes += config_changes(old[key], new[key], f"{path}.")
        elif old[key] != new[key]:
            changes.append(f"{path}: {old[key]!r} -> {new[key]!r}")
    return sorted(changes)


def completed_run(cfg, run_dir: Path) -> dict | None:
    """The record of a completed run of this config in run_dir, or None (none there, or force=true). A completed
    run of a different config is refused. Needs no torch, so that a sweep skips finished runs quickly."""
    previous = read_metrics(run_dir)
    if not previous or previous.get("status") != "completed" or cfg.force:
        return None
    changes = config_changes(previous.get("config", {}), OmegaConf.to_container(cfg, resolve=True))
    if changes:
        raise UserError(f"{run_dir} holds a completed run of a different config ({'; '.join(changes[:3])}); "
                        "pass force=true to replace it, or another output_root")
    logging.getLogger(__name__).info("%s already completed (force=true to rerun); skipping", run_dir)
    return previous


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "datasets", "accelerate", "sparsetune"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["git_commit"] = git_commit()
    return out


def git_commit() -> str | None:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        # Dirty means changed code or configs: the records under results/ change with every sweep.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results"], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def collect(dirs: list[str | Path], status: str = "completed") -> list[dict]:
    """Every metrics.json under the given folders with the given status."""
    records = []
    for d in dirs:
        for path in sorted(Path(d).rglob(METRICS_FILE)):
            rec = read_metrics(path.parent)
            if rec and rec.get("status") == status:
                rec["run_dir"] = str(path.parent)
                records.append(rec)
    return records


def flatten(rec: dict) -> dict:
    """One flat row per run: identity, every split's metrics and every cost figure."""
    row = {k: rec.get(k) for k in ("task", "backbone", "method", "seed", "run_dir")}
    row["variant"] = rec.get("variant") or Path(rec.get("run_dir", ".")).parent.name
    for split, metrics in (rec.get("metrics") or {}).items():
        for k, v in metrics.items():
            row[f"{split}.{k}"] = v
    for k, v in (rec.get("cost") or {}).items():
        row[f"cost.{k}"] = v
    row["headline"] = rec.get("headline_metric")
    return row


def comparison_table(records: list[dict], metric: str = "headline", split: str = "test",
                     rows: str = "method", cols: str = "task"):
    """mean ± std over seeds of one metric; rows x cols (e.g. method x task). Returns (display, numbers)."""
    import pandas as pd
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

    def fmt(v: float) -> str:  # scores with 4 decimals, counts and sizes as whole numbers
        return f"{v:,.0f}" if counts or abs(v) >= 1000 else f"{v:.4f}"

    cell = stats.apply(lambda s: f"{fmt(s['mean'])} ± {fmt(0 if np.isnan(s['std']) else s['std'])} (n={s['count']})"
                       if s["count"] > 1 else f"{fmt(s['mean'])} (n=1)", axis=1)
    display = stats.assign(cell=cell).pivot(index=rows, columns=cols, values="cell").fillna("")
    return display, stats
