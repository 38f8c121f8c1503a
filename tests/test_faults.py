"""Nothing stale, nothing clobbered: data changes, concurrent commands, partial checkpoints, SIGKILL, bad records,
refused commands, merge targets; and one line for each class of bad input."""
from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, run_tiny
from sparsetune_cli.errors import UserError

BIN = Path(sys.executable).parent / "sparsetune"
REPO = Path(__file__).resolve().parents[1]


def cli(*args, timeout=600, stdin=None):
    return subprocess.run([str(BIN), *args], capture_output=True, text=stdin is None or isinstance(stdin, str),
                          timeout=timeout, input=stdin)


def one_line_error(proc) -> str:
    lines = proc.stderr.strip().splitlines() if isinstance(proc.stderr, str) else \
        proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines[-1].startswith("sparsetune: error: ") and "Traceback" not in "\n".join(lines), lines[-5:]
    return lines[-1]


def small_bundle(root: Path, n: int = 60, offset: int = 0) -> Path:
    folder = root / "banking77"
    folder.mkdir(parents=True)
    rows = [{"text": f"question number {i + offset} about cards", "label": "a" if i % 2 else "b"} for i in range(n)]
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


FAST = ["backbone=tiny-encoder", "method=head_only", "task=banking77", "train.max_steps=2", "train.progress=false"]


# 1. stale results after the data changed
def test_a_completed_run_on_other_data_is_refused_and_force_replaces_it(tmp_path):
    a, b = small_bundle(tmp_path / "A"), small_bundle(tmp_path / "B", offset=1000)
    first, run_dir = run_tiny(tmp_path, [*FAST, f"data_dir={a}"])
    assert len(first["data"]["fingerprint"]) == 64
    with pytest.raises(UserError, match=r"completed run on other data \(fingerprint [0-9a-f]{12}, the data read now "
                                        r"[0-9a-f]{12}\).*force=true"):
        run_tiny(tmp_path, [*FAST, f"data_dir={b}"])
    again, _ = run_tiny(tmp_path, [*FAST, f"data_dir={a}"])          # the same data: skipped, the same record
    assert again == first
    replaced, _ = run_tiny(tmp_path, [*FAST, f"data_dir={b}", "force=true"])
    assert replaced["data"]["fingerprint"] != first["data"]["fingerprint"]


def test_records_from_before_fingerprints_are_still_reused(tmp_path):
    a, b = small_bundle(tmp_path / "A"), small_bundle(tmp_path / "B", offset=1000)
    first, run_dir = run_tiny(tmp_path, [*FAST, f"data_dir={a}"])
    old = json.loads((run_dir / "metrics.json").read_text())
    del old["data"]["fingerprint"], old["schema_version"]
    (run_dir / "metrics.json").write_text(json.dumps(old))
    again, _ = run_tiny(tmp_path, [*FAST, f"data_dir={b}"])   # nothing to compare: reused on its config alone
    assert again["status"] == "completed" and "fingerprint" not in again["data"]


# 2. two commands on one run folder
def test_a_run_folder_in_use_is_refused_at_once_and_a_sweep_skips_it(tmp_path, data_dir):
    from sparsetune_cli.record import RunLock
    args = ["run", *FAST, *TINY, f"data_dir={data_dir}", f"output_root={tmp_path}"]
    assert cli(*args).returncode == 0
    [run_dir] = [p.parent for p in tmp_path.rglob("metrics.json")]
    before = (run_dir / "metrics.json").read_bytes()
    with RunLock(run_dir):   # as if another command were running this folder
        t0 = time.time()
        proc = cli(*args, "force=true")
        assert f"in use by another sparsetune process (PID {os.getpid()})" in one_line_error(proc)
        swept = cli(*args[:1], "-m", *args[1:], "force=true")
        assert swept.returncode == 0 and "in use by another sparsetune process" in swept.stderr + swept.stdout
        assert time.time() - t0 < 120 and (run_dir / "metrics.json").read_bytes() == before
    done = cli(*args, "force=true")   # the lock went with its holder
    assert done.returncode == 0, done.stderr[-2000:]


# 3. merge never reports work it did not do
def test_merge_refuses_a_file_and_a_folder_with_files_unless_forced(tmp_path, data_dir):
    _, run_dir = run_tiny(tmp_path, ["method=full", f"data_dir={data_dir}", "train.max_steps=2"])
    target = tmp_path / "target"
    (tmp_path / "some_file").write_text("x")
    assert "is a file" in one_line_error(cli("merge", str(run_dir), str(tmp_path / "some_file")))
    target.mkdir()
    (target / "mine.txt").write_text("keep me")
    assert "already holds files; pass --force" in one_line_error(cli("merge", str(run_dir), str(target)))
    assert (target / "mine.txt").read_text() == "keep me"
    forced = cli("merge", str(run_dir), str(target), "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert not (target / "mine.txt").exists() and (target / "config.json").is_file()


# 4. ambiguous data is refused
def test_duplicate_header_names_and_null_labels_are_refused(tmp_path):
    from conftest import compose
    from sparsetune_cli.data import load_task
    folder = tmp_path / "data" / "banking77"
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text("text,label,text\nhello,a,other\nhi,b,more\n")
    (folder / "test.csv").write_text("text,label\nx,a\ny,b\n")
    cfg = compose(["task=banking77", f"data_dir={tmp_path / 'data'}"])
    with pytest.raises(UserError, match=r"train\.csv:1: the header names 'text' more than once"):
        load_task(cfg.task, cfg.data_dir)
    (folder / "train.csv").unlink()
    (folder / "train.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n')
    with pytest.raises(UserError, match=r"train\.jsonl:2: missing field 'label'"):
        load_task(cfg.task, cfg.data_dir)


# 5 and 6. a partial checkpoint, SIGKILL during its save, and what resume records
KILL_IN_SAVE = """
import os, signal, sys
from transformers import Trainer
real = Trainer._save_optimizer_and_scheduler
def save(self, output_dir):
    real(self, output_dir)
    if self.state.global_step >= {step}:   # the weights and optimizer are written, trainer_state.json is not
        os.kill(os.getpid(), signal.SIGKILL)
Trainer._save_optimizer_and_scheduler = save
from sparsetune_cli.cli import main
main(sys.argv[1:])
"""


def test_sigkill_during_a_checkpoint_save_resumes_from_the_last_whole_one(tmp_path, data_dir, caplog):
    args = ["run", "backbone=tiny-encoder", "method=full", "task=banking77", "task.train_limit=240",
            "task.eval_limit=40", "train.epochs=2", "train.batch_size=16", "train.eval_every=5",
            "train.logging_steps=1", "train.progress=false", "train.keep_checkpoints=true", f"data_dir={data_dir}"]
    ref = cli(*args, f"output_root={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "cut"
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SAVE.format(step=15), *args, f"output_root={out}"],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    [run_dir] = [p.parent for p in out.rglob("config.yaml")]
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} >= {"checkpoint-10", "checkpoint-15"}
    assert not (run_dir / "checkpoints" / "checkpoint-15" / "trainer_state.json").exists()   # partial

    again = cli(*args, f"output_root={out}")
    assert again.returncode == 0, again.stderr[-2000:]
    said = again.stdout + again.stderr
    assert "checkpoint-15 cannot be resumed from" in said and "falling back to checkpoint-10" in said
    done = json.loads((run_dir / "metrics.json").read_text())
    want = json.loads(next((tmp_path / "ref").rglob("metrics.json")).read_text())
    assert done["status"] == "completed" and done["metrics"] == want["metrics"]
    # every evaluation has a time, counted across the stop, in order
    seconds = [h["seconds"] for h in done["history"]]
    assert [h["step"] for h in done["history"]] == [h["step"] for h in want["history"]]
    assert all(s is not None for s in seconds) and seconds == sorted(seconds)
    # log.csv holds the rows an uninterrupted run's does, none twice
    def logged(folder):
        with open(next(folder.rglob("log.csv"))) as f:
            return sorted((r["step"], r["key"]) for r in csv.DictReader(f))
    assert logged(out) == logged(tmp_path / "ref")


def test_a_run_whose_only_checkpoint_is_corrupt_starts_over(tmp_path, caplog):
    from sparsetune_cli.record import last_good_checkpoint
    bad = tmp_path / "checkpoints" / "checkpoint-5"
    bad.mkdir(parents=True)
    (bad / "trainer_state.json").write_text('{"global_step": 5')   # truncated
    with caplog.at_level(logging.WARNING):
        assert last_good_checkpoint(tmp_path / "checkpoints") is None
    assert "starting over" in caplog.text and not bad.exists()


def test_checkpoint_folders_are_read_by_their_step(tmp_path):
    from sparsetune_cli.record import checkpoint_step, checkpoint_steps
    for name in ("checkpoint-5", "checkpoint-40", "checkpoint-x", "checkpoint-", "old-checkpoint-7", "tmp-9"):
        (tmp_path / name).mkdir()
    assert list(checkpoint_steps(tmp_path)) == [40, 5]   # newest first; other names are not checkpoints
    assert checkpoint_step(tmp_path / "checkpoint-40") == 40 and checkpoint_step(tmp_path / "tmp-9") is None
    assert checkpoint_steps(tmp_path / "missing") == {}


# 7. aggregation survives bad records
def test_tables_name_each_malformed_record_and_use_the_rest(tmp_path, caplog):
    from sparsetune_cli.record import collect, write_json_atomic
    good = {"status": "completed", "task": "trec", "backbone": "minilm", "method": "sparse", "seed": 0,
            "headline_metric": "accuracy", "metrics": {"test": {"accuracy": 0.8}}}
    write_json_atomic(tmp_path / "good" / "metrics.json", good)
    bad = {"truncated": '{"status": "completed", "task": "tr', "list": "[1]",
           "text_metric": json.dumps(dict(good, metrics={"test": {"accuracy": "high"}}))}
    for name, text in bad.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(text)
    with caplog.at_level(logging.WARNING):
        found = collect([tmp_path])
    assert [r.run_dir for r in found] == [str(tmp_path / "good")]
    for name in bad:
        assert caplog.text.count(str(tmp_path / name)) == 1, name
    proc = cli("table", str(tmp_path))
    assert proc.returncode == 0 and "0.8000 (n=1)" in proc.stdout
    assert all(str(tmp_path / name) in proc.stderr for name in bad)


# 8. a refused command changes nothing in the run folder
def test_a_refused_command_leaves_every_file_of_the_run_as_it_was(tmp_path, data_dir):
    args = ["run", *FAST, *TINY, f"data_dir={data_dir}", f"output_root={tmp_path}"]
    assert cli(*args).returncode == 0
    [record] = list(tmp_path.rglob("metrics.json"))
    stored = json.loads(record.read_text())
    stored["config"]["method"]["lr"] = 0.5   # as if a YAML default changed since the run completed
    record.write_text(json.dumps(stored))

    def snapshot():
        return {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file() and p.suffix != ".log"}
    before = snapshot()
    assert "holds a completed run of a different config (method.lr: 0.5 -> 0.01)" in one_line_error(cli(*args))
    assert snapshot() == before


# one line for each class of bad input
@pytest.mark.parametrize("override,message", [
    ("train.epochs=abc", "train.epochs='abc' is not valid: expected a number"),
    ("method.lr=fast", "method.lr='fast' is not valid: expected a number"),
    ("seed=abc", "seed='abc' is not valid: expected an integer"),
    ("train.batch_size=2.5", "train.batch_size=2.5 is not valid: expected an integer"),
    ("task.train_limit=many", "task.train_limit='many' is not valid: expected an integer"),
    ("train.progress=maybe", "train.progress='maybe' is not valid: expected true or false"),
    ("method.budget=lots", "method.budget='lots' is not valid: expected a number"),
    ("method.probe_batches=0", "method.probe_batches=0 is out of range"),
    ("method.probe_head_steps=-1", "method.probe_head_steps=-1 is out of range"),
    ("method.selector=best", "method.selector='best': choose one of"),
    ("task=entity_matching task.attributes=name", "task.attributes='name' is not valid: expected a list"),
    # the command line's value, not the experiment's task_overrides (max_length 96), reaches the check
    ("experiment=paper_full_cpu task=entity_matching task.max_length=4", "task.max_length=4 is out of range"),
])
def test_a_value_of_the_wrong_type_names_its_key_in_one_line(tmp_path, override, message):
    proc = cli("run", "backbone=tiny-encoder", "method=sparse", f"output_root={tmp_path}", *override.split(),
               timeout=120)
    assert one_line_error(proc) == f"sparsetune: error: {message}" or message in one_line_error(proc)
    assert not list(tmp_path.rglob("metrics.json"))


def test_bytes_that_are_not_utf8_are_named_by_file_and_line(tmp_path):
    folder = tmp_path / "banking77"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(b'{"text": "fine", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    (folder / "test.jsonl").write_text('{"text": "x", "label": "a"}\n')
    proc = cli("run", *FAST, f"data_dir={tmp_path}", f"output_root={tmp_path / 'out'}", timeout=120)
    assert "train.jsonl:2: not UTF-8 (byte 0xe9 at column 14); re-save the file as UTF-8" in one_line_error(proc)
    pred = cli("predict", str(tmp_path), stdin=b"ok\n\xff\n", timeout=120)
    assert pred.returncode == 2


def test_predict_reads_stdin_and_names_a_line_that_is_not_utf8(tmp_path, data_dir):
    _, run_dir = run_tiny(tmp_path, ["method=head_only", f"data_dir={data_dir}", "train.max_steps=2"])
    ok = cli("predict", str(run_dir), stdin="how do I top up\n\nmy card is lost\n", timeout=120)
    assert ok.returncode == 0 and len(ok.stdout.strip().splitlines()) == 2
    bad = cli("predict", str(run_dir), stdin=b"fine\n\xff\xfe\n", timeout=120)
    assert one_line_error(bad) == "sparsetune: error: stdin:2: not UTF-8; give predict UTF-8 text"


def test_a_signal_during_the_test_pass_completes_that_run_and_stops_the_sweep(tmp_path, data_dir, monkeypatch):
    """A SIGTERM after training (here in the final test pass) cannot checkpoint anything: the run completes and
    is recorded, and the sweep stops there (exit 130) instead of starting its next run."""
    from sparsetune_cli import cli as cli_module
    from sparsetune_cli import train
    from sparsetune_cli.callbacks import StopOnSignal
    original = train.SparsetuneTrainer.evaluate

    def evaluate(self, *args, metric_key_prefix="eval", **kwargs):
        if metric_key_prefix == "test":
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, metric_key_prefix=metric_key_prefix, **kwargs)
    monkeypatch.setattr(train.SparsetuneTrainer, "evaluate", evaluate)
    monkeypatch.setattr(StopOnSignal, "received", None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        cli_module.main(["run", "-m", "backbone=tiny-encoder", "method=head_only", f"data_dir={data_dir}",
                         f"output_root={tmp_path}", "seed=0,1", *TINY])
    assert stopped.value.code == 130
    records = [json.loads(p.read_text()) for p in tmp_path.rglob("metrics.json")]
    assert [(r["status"], r["seed"]) for r in records] == [("completed", 0)]
