"""Tasks: read a labeled split from the local bundle (or the hub), turn rows into model inputs."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .formats import encode, row_formatter

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("train", "validation", "test")


@dataclass
class TaskData:
    """Raw rows per split, already formatted as (text, text_pair) plus the label name."""
    splits: dict[str, list[dict]]      # split -> [{"text": str, "text_pair": str|None, "label": str}]
    labels: list[str]                  # index -> label name, from train
    source: str                        # where the rows came from

    @property
    def fingerprint(self) -> str:
        """A content hash of the rows this run uses (after sampling and limits) and the label order: part of a
        run's identity, so a changed data file never passes for the same run."""
        h = hashlib.sha256(json.dumps(self.labels).encode())
        for split in sorted(self.splits):
            h.update(split.encode())
            for r in self.splits[split]:
                h.update(json.dumps([r["text"], r["text_pair"], r["label"]]).encode())
        return h.hexdigest()


def candidate_data_dirs(data_dir: str | None) -> list[Path]:
    if data_dir:
        return [Path(data_dir).expanduser()]
    dirs = []
    if os.environ.get("SPARSETUNE_DATA_DIR"):
        dirs.append(Path(os.environ["SPARSETUNE_DATA_DIR"]).expanduser())
    dirs.append(REPO_ROOT.parent / "shared" / "data")   # the repo checked out beside the bundle
    return dirs


def text_lines(path: Path):
    """(line number, line) of a UTF-8 text file; bytes that are not UTF-8 are named by file:line. The one way
    data files are decoded."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "re-save the file as UTF-8") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg}); fix or remove that line")
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object per line")
        row["_where"] = f"{path}:{lineno}"
        rows.append(row)
    return rows


def read_csv(path: Path) -> list[dict]:
    import csv
    rows = []
    reader = csv.DictReader((line for _, line in text_lines(path)), strict=True)
    header = reader.fieldnames or []
    dups = sorted({name for name in header if header.count(name) > 1})
    if dups:   # DictReader would keep the last column of each name, silently
        raise UserError(f"{path}:1: the header names {', '.join(repr(d) for d in dups)} more than once; "
                        "give every column its own name")
    start = 2   # the line where the next record begins (a quoted field may span lines)
    try:
        for row in reader:
            where = f"{path}:{start}"
            extra, missing = row.pop(None, []), [k for k, v in row.items() if v is None]
            if extra or missing:
                raise UserError(f"{where}: {len(reader.fieldnames) + len(extra) - len(missing)} fields where the "
                                f"header has {len(reader.fieldnames)}; quote fields that contain commas")
            rows.append(dict(row, _where=where))
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{path}:{start}: malformed CSV ({e}); check the quotes from this line on") from None
    return rows


def find_split_file(folder: Path, split: str) -> Path | None:
    for ext in ("jsonl", "json", "csv"):
        if (folder / f"{split}.{ext}").is_file():
            return folder / f"{split}.{ext}"
    return None


def load_task(task, data_dir: str | None, seed: int = 0) -> TaskData:
    """Read every split, carve validation when missing, apply limits; labels come from train."""
    raw, source = _read_local(task, data_dir)
    if raw is None:
        raw, source = _read_hub(task, data_dir)
    format_row = row_formatter(task)
    splits = {name: [format_row(r) for r in rows] for name, rows in raw.items()}
    if "validation" not in splits:
        splits["train"], splits["validation"] = carve_validation(
            splits["train"], task.validation_fraction, task.split_seed)
    labels = sorted({r["label"] for r in splits["train"]})
    if len(labels) < 2:
        raise UserError(f"{source}: the train split has a single class ({labels}); a classifier needs two or more")
    known = set(labels)
    for name in ("validation", "test"):
        unseen = sum(r["label"] not in known for r in splits[name])
        if unseen:
            log.warning("%d %s examples have labels absent from train; they count as wrong", unseen, name)
    if task.get("train_limit"):
        splits["train"] = _sample(splits["train"], task.train_limit, seed)
    if task.get("eval_limit"):
        for name in ("validation", "test"):
            splits[name] = _sample(splits[name], task.eval_limit, task.split_seed)
    return TaskData(splits=splits, labels=labels, source=source)


def _read_local(task, data_dir):
    for base in candidate_data_dirs(data_dir):
        folder = base / task.dataset
        if not folder.is_dir():
            continue
        files = {s: find_split_file(folder, s) for s in SPLITS}
        for s in ("train", "test"):
            if files[s] is None:
                raise UserError(f"{folder}: no {s}.jsonl (or .csv); a task folder needs train and test splits")
        raw = {s: (read_csv(p) if p.suffix == ".csv" else read_jsonl(p)) for s, p in files.items() if p}
        if task.get("include_oos"):
            for s in list(raw):
                oos = find_split_file(folder, f"oos_{s}")
                if oos:
                    raw[s] += read_jsonl(oos)
        for s, rows in raw.items():
            if not rows:
                raise UserError(f"{files[s]}: the {s} split is empty")
        return raw, str(folder)
    return None, None


def _read_hub(task, data_dir):
    looked = [str(b / task.dataset) for b in candidate_data_dirs(data_dir)]
    hint = ("Point sparsetune at the bundle with data_dir=/path/to/data or SPARSETUNE_DATA_DIR "
            "(a folder with one subfolder per dataset holding train/validation/test .jsonl)")
    if not task.get("hub"):
        raise UserError(f"no data for task {task.name}: looked in {', '.join(looked)}; this task has no hub copy. {hint}")
    try:
        from datasets import load_dataset
        ds = load_dataset(task.hub.path, task.hub.get("name"))
    except Exception as e:  # offline, unknown id, ...
        raise UserError(f"no data for task {task.name}: looked in {', '.join(looked)} and on the hub "
                        f"({task.hub.path}: {type(e).__name__}). {hint}") from None
    raw = {}
    for split, d in ds.items():
        name = {"val": "validation", "dev": "validation"}.get(split, split)
        if name not in SPLITS:
            continue
        feat = d.features[task.hub.label]
        to_name = feat.int2str if hasattr(feat, "int2str") else str
        raw[name] = [{task.get("text_field", "text"): r[task.hub.text], task.label_field: to_name(r[task.hub.label]),
                      "_where": f"{task.hub.path}[{split}]:{i}"} for i, r in enumerate(d)]
    if not task.get("include_oos"):
        raw = {s: [r for r in rows if r[task.label_field] != "oos"] for s, rows in raw.items()}
    return raw, f"hub:{task.hub.path}"


def carve_validation(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Stratified split; classes with fewer than 2 examples stay in train."""
    from sklearn.model_selection import train_test_split
    counts = Counter(r["label"] for r in rows)
    rare = [r for r in rows if counts[r["label"]] < 2]
    common = [r for r in rows if counts[r["label"]] >= 2]
    n_classes = len({r["label"] for r in common})
    n_val = max(int(round(fraction * len(common))), n_classes)
    train, val = train_test_split(common, test_size=n_val, random_state=seed,
                                  stratify=[r["label"] for r in common])
    return train + rare, val


def _sample(rows: list[dict], n: int, seed: int) -> list[dict]:
    """A stratified sample of n rows when possible (keeps every class), else a random one."""
    if n >= len(rows):
        return rows
    from sklearn.model_selection import train_test_split
    labels = [r["label"] for r in rows]
    try:
        keep, _ = train_test_split(rows, train_size=n, random_state=seed, stratify=labels)
    except ValueError:  # a class too small to stratify, or n smaller than the class count
        keep, _ = train_test_split(rows, train_size=n, random_state=seed)
    return keep


def tokenize(data: TaskData, tokenizer, max_length: int,
             cache_dir: Path | None = None) -> tuple[dict[str, Dataset], dict[str, int]]:
    """Tokenized datasets per split (dynamic padding happens in the collator) and truncation counts. With a
    cache_dir they are saved there under a hash of the rows, labels, tokenizer and max_length, so the runs of
    a sweep tokenize each task once."""
    from datasets import Dataset, load_from_disk   # imported here: reading and fingerprinting data need no arrow
    key = tokenized_key(data, tokenizer, max_length) if cache_dir is not None else None
    folder = Path(cache_dir) / key if key else None
    if folder is not None and (folder / "truncated.json").exists():
        log.info("tokenized splits from %s", folder)
        return ({split: load_from_disk(str(folder / split)) for split in data.splits},
                json.loads((folder / "truncated.json").read_text()))
    label_id = {name: i for i, name in enumerate(data.labels)}
    out, truncated = {}, {}
    for split, rows in data.splits.items():
        full = encode(tokenizer, rows, max_length, truncation=False)["input_ids"]
        truncated[split] = sum(len(ids) > max_length for ids in full)
        enc = encode(tokenizer, rows, max_length)
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        # Labels never seen in train get -100: ignored by the loss, and always counted wrong.
        enc["labels"] = [label_id.get(r["label"], -100) for r in rows]
        out[split] = Dataset.from_dict(enc)
    if folder is not None:
        _save_tokenized(folder, out, truncated)
    return out, truncated


def tokenized_cache_dir() -> Path:
    """Where runs cache tokenized splits: in the datasets cache, so HF_DATASETS_CACHE (or HF_HOME) moves it."""
    from datasets import config
    return Path(config.HF_DATASETS_CACHE) / "sparsetune-tokenized"


def tokenized_key(data: TaskData, tokenizer, max_length: int) -> str | None:
    """A hash of everything tokenize's output depends on, or None for a tokenizer without a serializable
    backend (those are not cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    for per_call_state in ("truncation", "padding"):   # set by tokenize's own calls, not part of the tokenizer
        spec.pop(per_call_state, None)
    digest = hashlib.sha256(json.dumps({"version": 1, "tokenizer": spec, "class": type(tokenizer).__name__,
                                        "truncation_side": tokenizer.truncation_side, "max_length": max_length,
                                        "labels": data.labels, "splits": data.splits}, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def _save_tokenized(folder: Path, datasets: dict[str, Dataset], truncated: dict[str, int]) -> None:
    """Written to a temporary folder, then renamed: parallel jobs and interrupted runs never leave a partial
    entry. A cache that cannot be written only costs time."""
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        for split, ds in datasets.items():
            ds.save_to_disk(str(tmp / split))
        (tmp / "truncated.json").write_text(json.dumps(truncated))
        tmp.rename(folder)
    except OSError as e:   # another job saved the same entry first, or the disk is read-only or full
        if not (folder / "truncated.json").exists():
            log.warning("could not cache tokenized splits in %s: %s", folder.parent, e)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def longest_first(ds: Dataset) -> Dataset:
    """Rows sorted by length, longest first, for evaluation: each batch then pads to about its own rows'
    length (half the eval time on banking77 and srl) and a batch too big for memory fails at once."""
    lengths = np.fromiter((len(ids) for ids in ds["input_ids"]), dtype=np.int64, count=len(ds))
    return ds.select(np.argsort(-lengths, kind="stable"))
