"""Bad data gets one clear line naming the file and line, and never touches finished results."""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, compose
from sparsetune_cli.data import load_task
from sparsetune_cli.errors import UserError

BIN = Path(sys.executable).parent / "sparsetune"


def bundle(tmp_path: Path, train: list, test: list | None = None, raw_train: str | None = None) -> Path:
    folder = tmp_path / "data" / "banking77"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text(raw_train if raw_train is not None else
                                        "".join(json.dumps(r) + "\n" for r in train))
    if test is not None:
        (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    return tmp_path / "data"


GOOD = [{"text": f"text {i}", "label": "a" if i % 2 else "b"} for i in range(40)]


def load(data_dir):
    cfg = compose(["task=banking77", f"data_dir={data_dir}"])
    return load_task(cfg.task, cfg.data_dir)


@pytest.mark.parametrize("rows,message", [
    (GOOD[:5] + [{"label": "a"}] + GOOD[5:], r"train\.jsonl:6: missing field 'text'"),
    (GOOD[:2] + [{"text": "x"}] + GOOD[2:], r"train\.jsonl:3: missing field 'label'"),
    (GOOD[:3] + [{"text": "   ", "label": "a"}], r"train\.jsonl:4: empty text"),
    ([{"text": f"t{i}", "label": "a"} for i in range(10)], r"single class"),
])
def test_bad_rows_name_file_and_line(tmp_path, rows, message):
    with pytest.raises(UserError, match=message):
        load(bundle(tmp_path, rows, GOOD[:4]))


def test_missing_split_is_named(tmp_path):
    with pytest.raises(UserError, match=r"no test\.jsonl"):
        load(bundle(tmp_path, GOOD))


def test_unseen_labels_warn_with_count_and_count_as_wrong(tmp_path, caplog):
    test = GOOD[:4] + [{"text": "new", "label": "zzz"}, {"text": "new2", "label": "zzz"}]
    with caplog.at_level(logging.WARNING):
        data = load(bundle(tmp_path, GOOD, test))
    assert "2 test examples have labels absent from train" in caplog.text
    assert data.labels == ["a", "b"]


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_failing_runs_leave_finished_results_untouched(tmp_path, data_dir):
    out = tmp_path / "out"
    ok = subprocess.run([str(BIN), "run", "backbone=tiny-encoder", "method=head_only", f"output_root={out}",
                         f"data_dir={data_dir}", *TINY], capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    before = snapshot(out)
    bad_data = bundle(tmp_path, GOOD, GOOD[:4], raw_train='{"text": "a", "label": "x"}\n{oops\n')
    for args, message in [(["train.epochs=-1"], "train.epochs=-1 is out of range"),
                          (["task=banking77", f"data_dir={bad_data}"], "train.jsonl:2: malformed JSON")]:
        proc = subprocess.run([str(BIN), "run", "backbone=tiny-encoder", "method=head_only", f"output_root={out}",
                               f"data_dir={data_dir}", *TINY, *args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before
    failed = [json.loads((out / k).read_text()) for k in after if k.endswith("metrics.json") and k not in before]
    assert [r["status"] for r in failed] == ["failed"]      # the data error is recorded in its own run folder


@pytest.mark.parametrize("raw,message", [
    ("text,label\nhello,a\nhi there,b,extra\n", r"train\.csv:3: 3 fields where the header has 2; quote fields"),
    ("text,label\nhello,a\nlonely\n", r"train\.csv:3: 1 fields where the header has 2"),
    ('text,label\nhello,a\n"never closed,b\n', r"train\.csv:3: malformed CSV"),
])
def test_malformed_csv_names_file_and_line(tmp_path, raw, message):
    folder = tmp_path / "data" / "banking77"
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text(raw)
    (folder / "test.csv").write_text("text,label\nx,a\ny,b\n")
    with pytest.raises(UserError, match=message):
        load(tmp_path / "data")


def test_good_csv_loads(tmp_path):
    folder = tmp_path / "data" / "banking77"
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text('text,label\n"hello, world",a\nhi,b\nyo,a\nhey,b\n')
    (folder / "test.csv").write_text("text,label\nx,a\ny,b\n")
    data = load(tmp_path / "data")
    texts = [r["text"] for split in data.splits.values() for r in split]
    assert data.labels == ["a", "b"] and "hello, world" in texts
