"""A run's folder and its record (metrics.json): the one place that writes, reads and checks them.

A run folder holds config.yaml (the resolved config), labels.json, metrics.json (a RunRecord), log.csv,
model/ (what trained, once completed) and checkpoints/ (while it runs). Train writes the record through
RunRecord; table, paper, predict and the CLI read it back through RunRecord.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf

from .config import ADDED_KEYS, non_result_keys
from .errors import UserError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
LABELS_FILE = "labels.json"
LOG_FILE = "log.csv"
LOCK_FILE = ".lock"
MODEL_DIR = "model"
CHECKPOINTS = "checkpoints"
REPO_ROOT = Path(__file__).resolve().parent.parent
# Final states: a rerun of the same config skips them. A diverged run (its training loss became non-finite) would
# only diverge again, and a learning-rate grid counts it as that lr's (worst) result.
FINISHED = ("completed", "diverged")
SCHEMA_VERSION = 2   # 1: records written before the version was recorded (they load the same way)


class BadRecord(ValueError):
    """A metrics.json that is not a run record: truncated, not an object, or with non-numeric metrics."""


@dataclasses.dataclass
class RunRecord:
    status: str                       # running | interrupted | failed | diverged | completed
    task: str
    backbone: str
    method: str
    seed: int
    headline_metric: str
    config: dict
    versions: dict
    schema_version: int = SCHEMA_VERSION
    precision: str | None = None      # what train.precision resolved to
    device: str | None = None         # cpu, or the GPU's name
    variant: str | None = None        # the overrides that name the run folder (e.g. method.lr=0.001)
    data: dict | None = None          # source, sizes, truncation, fingerprint of the rows used
    cost: dict | None = None
    metrics: dict | None = None       # split -> {accuracy, macro_f1, [f1], loss}
    history: list | None = None       # validation headline per evaluation: step, epoch, score, seconds
    weights_sha256: str | None = None
    error: str | None = None
    run_dir: str | None = dataclasses.field(default=None, metadata={"saved": False})   # where it was read from

    @classmethod
    def new(cls, cfg, **extra) -> RunRecord:
        return cls(status="running", task=cfg.task.name, backbone=cfg.backbone.name, method=cfg.method.name,
                   seed=cfg.seed, headline_metric=cfg.task.headline_metric,
                   config=OmegaConf.to_container(cfg, resolve=True), versions=package_versions(), **extra)

    @classmethod
    def from_dict(cls, d: Any) -> RunRecord:
        if not isinstance(d, dict):
            raise BadRecord(f"not a JSON object but {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("status", "task", "method") if k not in d]
        if missing:
            raise BadRecord(f"no {', '.join(missing)}")
        for split, scores in (d.get("metrics") or {}).items():
            if not isinstance(scores, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       and math.isfinite(v) for v in scores.values()):
                raise BadRecord(f"metrics.{split} holds a value that is not a finite number")
        fields = {k: v for k, v in d.items() if k in names}
        fields.setdefault("schema_version", 1)
        for k in ("backbone", "headline_metric"):
            fields.setdefault(k, None)
        fields.setdefault("seed", None)
        fields.setdefault("config", {})
        fields.setdefault("versions", {})
        return cls(**fields)

    def to_dict(self) -> dict:
        saved = {f.name for f in dataclasses.fields(self) if f.metadata.get("saved", True)}
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k in saved}

    def headline(self, split: str = "validation") -> float:
        return self.metrics[split][self.headline_metric]

    def write(self, run_dir: Path) -> None:
        write_json_atomic(Path(run_dir) / METRICS_FILE, self.to_dict())

    @classmethod
    def read(cls, run_dir: Path) -> RunRecord | None:
        """The run's record; None when there is none. A malformed one raises BadRecord."""
        path = Path(run_dir) / METRICS_FILE
        if not path.is_file():
            return None
        try:
            rec = cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRecord(f"not valid JSON ({e})") from None
        rec.run_dir = str(run_dir)
        rec.variant = rec.variant or Path(run_dir).parent.name   # older records: the folder names it
        return rec


def read_record(run_dir: Path) -> RunRecord | None:
    """The record, or None for none or a malformed one (a run that was cut off while writing counts as absent)."""
    try:
        return RunRecord.read(run_dir)
    except BadRecord as e:
        log.warning("%s: ignoring a malformed %s (%s)", run_dir, METRICS_FILE, e)
        return None


def collect(dirs: list[str | Path], status: str | tuple[str, ...] = "completed") -> list[RunRecord]:
    """Every record under the given folders with the given status (or one of them). A malformed metrics.json is
    named once in a warning and left out: one bad file must not hide the rest."""
    statuses = (status,) if isinstance(status, str) else status
    records = []
    for d in dirs:
        for path in sorted(Path(d).rglob(METRICS_FILE)):
            rec = read_record(path.parent)
            if rec is not None and rec.status in statuses:
                records.append(rec)
    return records


class RunLock:
    """A run folder is owned by one process: an OS lock on its .lock file, released when the process exits, however
    it exits (the kernel drops it after a crash or SIGKILL too). A second command on the same folder fails at once
    with one line naming the holder; a sweep logs it and goes on with its other jobs."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.file = None

    def __enter__(self) -> RunLock:
        self.file = open(self.run_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise UserError(f"{self.run_dir} is in use by another sparsetune process (PID {holder}); wait for it to "
                            "finish or stop it, then run again") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc) -> bool:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        return False


def checkpoint_problem(folder: Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from, or None when it is whole. The Trainer writes the weights,
    the optimizer and scheduler, the RNG state and last trainer_state.json: a save cut off by a kill or a full disk
    leaves that file missing or truncated, or an earlier file short."""
    state = folder / "trainer_state.json"
    try:
        if not isinstance(json.loads(state.read_text()).get("global_step"), int):
            return "trainer_state.json has no global_step"
    except (OSError, ValueError, AttributeError) as e:
        return f"trainer_state.json is missing or unreadable ({type(e).__name__})"
    weights = [f for f in folder.glob("*.safetensors")]
    if not weights:
        return "no weights file"
    from safetensors import safe_open
    for f in weights:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():   # reading each tensor checks that the file holds all its bytes
                    st.get_slice(key)
        except Exception as e:   # safetensors raises its own error types for a truncated file
            return f"{f.name} is unreadable ({type(e).__name__})"
    for name in ("optimizer.pt", "scheduler.pt"):
        if (folder / name).exists() and (folder / name).stat().st_size == 0:
            return f"{name} is empty"
    return None


def checkpoint_step(folder: Path) -> int | None:
    """The STEP of a Trainer checkpoint folder (checkpoint-STEP); None for any other name."""
    head, _, step = folder.name.rpartition("-")
    return int(step) if head == "checkpoint" and step.isdigit() else None


def checkpoint_steps(checkpoints: Path) -> dict[int, Path]:
    """The Trainer's checkpoint folders by step, newest first; read only."""
    found = {s: p for p in checkpoints.glob("checkpoint-*") if (s := checkpoint_step(p)) is not None}
    return dict(sorted(found.items(), reverse=True))


def last_good_checkpoint(checkpoints: Path) -> Path | None:
    """The newest whole checkpoint to resume from. A partial or corrupt newer one is named in a warning and
    removed (the Trainer would otherwise try it, or rotate the good one away); None means start over."""
    found = checkpoint_steps(checkpoints)
    for step, folder in found.items():
        problem = checkpoint_problem(folder)
        if problem is None:
            log.info("resuming from %s", folder)
            return folder
        older = [p.name for s, p in found.items() if s < step]
        log.warning("%s cannot be resumed from (%s); %s", folder, problem,
                    f"falling back to {older[0]}" if older else "starting over")
        shutil.rmtree(folder, ignore_errors=True)
    return None


def classification_metrics(logits, labels, positive: int | None = None) -> dict:
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


def mean_std(mean: float, std: float, n: int, fmt: str = "{:.4f}") -> str:
    """The one spelling of a cell over seeds: mean ± std (n=seeds), or mean (n=1)."""
    if n > 1:
        return f"{fmt.format(mean)} ± {fmt.format(0 if math.isnan(std) else std)} (n={n})"
    return f"{fmt.format(mean)} (n=1)"


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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_changes(old: dict, new: dict, prefix: str = "", ignore: frozenset[str] | None = None,
                   added: dict | None = None) -> list[str]:
    """Keys whose values differ, leaving out keys that do not change results. A key the old config lacks (its run
    predates the key) counts as its value in `added` (dotted key -> the value that does what runs did before the
    key existed); a key missing there too is a change, since what the old run did is not known."""
    ignore = non_result_keys() if ignore is None else ignore
    added = ADDED_KEYS if added is None else added
    changes = []
    for key in old.keys() & new.keys():
        path = f"{prefix}{key}"
        if path in ignore:
            continue
        if isinstance(old[key], dict) and isinstance(new[key], dict):
            changes += config_changes(old[key], new[key], f"{path}.", ignore, added)
        elif old[key] != new[key]:
            changes.append(f"{path}: {old[key]!r} -> {new[key]!r}")
    for key in new.keys() - old.keys():
        path = f"{prefix}{key}"
        if path in ignore:
            continue
        if path not in added:
            changes.append(f"{path}: not recorded (the run predates the key) -> {new[key]!r}")
        elif new[key] != added[path]:
            changes.append(f"{path}: {added[path]!r} (the run predates the key) -> {new[key]!r}")
    return sorted(changes)


def same_config(previous: RunRecord, cfg, run_dir: Path, what: str,
                method_defaults: Callable[[], dict] = dict) -> None:
    """Refuse to reuse or resume `previous` (the record in run_dir) under a config that gives other results.
    `method_defaults()` gives the method's Options defaults, asked for only when the record lacks a method key
    (a caller that has not imported the methods, and torch, need not for a record that lacks none)."""
    new = OmegaConf.to_container(cfg, resolve=True)
    added = dict(ADDED_KEYS)
    if set(new.get("method", {})) - set(previous.config.get("method", {})):
        added.update({f"method.{k}": v for k, v in method_defaults().items()})
    changes = config_changes(previous.config, new, added=added)
    if changes:
        raise UserError(f"{run_dir} holds {what} of a different config ({'; '.join(changes[:3])}); "
                        "pass force=true to replace it, or another output_root")


def finished_run(cfg, run_dir: Path, fingerprint=None, method_defaults: Callable[[], dict] = dict
                 ) -> RunRecord | None:
    """The record of a finished (completed or diverged) run of this config in run_dir, or None (none there, or
    force=true). A finished run of a different config, or of other data, is refused. Needs no torch, so that a
    sweep skips finished runs quickly. `fingerprint()` gives the data's fingerprint; records from before
    fingerprints were kept have none and are reused on their config alone."""
    previous = read_record(run_dir)
    if previous is None or previous.status not in FINISHED or cfg.force:
        return None
    same_config(previous, cfg, run_dir, f"a {previous.status} run", method_defaults)
    recorded = (previous.data or {}).get("fingerprint")
    if recorded is not None and fingerprint is not None:
        now = fingerprint()
        if now != recorded:
            raise UserError(f"{run_dir} holds a {previous.status} run on other data (fingerprint {recorded[:12]}, "
                            f"the data read now {now[:12]}): the data files changed; pass force=true to replace it, "
                            "or another output_root")
    log.info("%s already %s (force=true to rerun); skipping", run_dir, previous.status)
    return previous


def usable_cpus() -> int:
    """The CPU cores this process may run on: its affinity where the OS has one (a cluster job pinned to 4 of a
    node's 64 cores gets 4), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else what platform says). Float sums depend on the kernels the
    CPU selects: the same run on two machines gives curves that drift apart within an epoch or two."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Processor", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


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
