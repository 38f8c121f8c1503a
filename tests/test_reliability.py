"""Faults lose nothing: SIGTERM then rerun equals an uninterrupted run; same seed, same metrics;
a diverging loss fails the run with the reason."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_tiny

BIN = Path(sys.executable).parent / "sparsetune"
LONG = ["backbone=tiny-encoder", "method=full", "task=banking77", "task.train_limit=600", "task.eval_limit=100",
        "train.epochs=2", "train.batch_size=8", "train.logging_steps=5", "train.progress=false", "method.lr=1e-3"]


def metrics_of(root: Path) -> dict:
    (path,) = list(root.rglob("metrics.json"))
    return json.loads(path.read_text())


def test_sigterm_saves_and_rerun_resumes_to_the_same_result(tmp_path, data_dir):
    ref = subprocess.run([str(BIN), "run", *LONG, f"output_root={tmp_path / 'ref'}", f"data_dir={data_dir}"],
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "cut"
    args = [str(BIN), "run", *LONG, f"output_root={out}", f"data_dir={data_dir}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:       # wait until training is into the second epoch (75 steps each), so that
        logs = list(out.rglob("log.csv"))  # the epoch-1 validation is recorded before the cut
        if logs and any(line.startswith(("90,", "95,", "100,")) for line in logs[0].read_text().splitlines()):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    cut = metrics_of(out)
    assert cut["status"] == "interrupted" and "resume" in cut["error"]
    assert list(out.rglob("checkpoint-*")), "no checkpoint was saved on SIGTERM"
    assert 75 < cut["cost"]["steps"] < metrics_of(tmp_path / "ref")["cost"]["steps"]

    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    done, want = metrics_of(out), metrics_of(tmp_path / "ref")
    assert done["status"] == "completed" and done["cost"]["steps"] == want["cost"]["steps"]
    for split in ("validation", "test"):
        for key, value in want["metrics"][split].items():
            assert done["metrics"][split][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (split, key)
    # the per-epoch validation scores too, including the one computed before the cut
    assert [h["step"] for h in done["history"]] == [h["step"] for h in want["history"]] == [75, 150]
    for got, ref_entry in zip(done["history"], want["history"]):
        assert got["accuracy"] == pytest.approx(ref_entry["accuracy"], abs=1e-6), got["step"]


def test_same_seed_gives_identical_metrics(tmp_path, data_dir):
    a, _ = run_tiny(tmp_path / "a", ["method=sparse", f"data_dir={data_dir}", "method.budget=0.005"])
    b, _ = run_tiny(tmp_path / "b", ["method=sparse", f"data_dir={data_dir}", "method.budget=0.005"])
    assert a["metrics"] == b["metrics"]
    c, _ = run_tiny(tmp_path / "c", ["method=sparse", f"data_dir={data_dir}", "method.budget=0.005", "seed=1"])
    assert c["metrics"] != a["metrics"]


def test_a_diverging_run_is_recorded_as_diverged_and_never_resumed(tmp_path, data_dir, monkeypatch):
    """A non-finite loss ends the run as `diverged`, a final state: its checkpoints (the steps that led there)
    go, so that a rerun cannot resume into the same divergence and, after enough such resumes, end as completed
    on early stopping (a GPU grid did that); a rerun of the same config skips it."""
    from sparsetune_cli import train
    overrides = ["method=full", f"data_dir={data_dir}", "method.lr=1e12", "train.logging_steps=1",
                 "train.max_grad_norm=1e30", "train.warmup=0", "train.eval_every=1"]
    rec, run_dir = run_tiny(tmp_path, overrides)
    assert rec["status"] == "diverged" and "loss became nan" in rec["error"] and "lower method.lr" in rec["error"]
    assert "metrics" not in rec and rec["history"], rec   # the evaluations before the stop are kept
    assert not (run_dir / "checkpoints").exists()

    def train_again(*a, **k):
        raise AssertionError("a diverged run was trained again")
    monkeypatch.setattr(train, "_train_and_evaluate", train_again)
    assert run_tiny(tmp_path, overrides)[0] == rec


def test_gpu_out_of_memory_names_the_settings_to_lower(tmp_path, monkeypatch):
    import torch

    from sparsetune_cli import train
    from sparsetune_cli.errors import UserError

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(train, "_train_and_evaluate", oom)
    with pytest.raises(UserError, match=r"lower train\.batch_size \(now 32.*task\.max_length"):
        run_tiny(tmp_path, [])
    rec = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rec["status"] == "failed" and "out of GPU memory" in rec["error"]


def epoch_orders(tmp_path: Path, overrides: list[str], epochs: int = 2) -> list[list[int]]:
    """The row order of each epoch as the run's Trainer draws it (its prepared train dataloader, set to each epoch
    as the training loop sets it)."""
    import torch
    from datasets import Dataset
    from transformers import Trainer

    from conftest import compose
    from sparsetune_cli.train import training_arguments
    cfg = compose(["backbone=tiny-encoder", *overrides])
    rows = Dataset.from_dict({"input_ids": [[i] for i in range(24)], "labels": [0] * 24})
    trainer = Trainer(model=torch.nn.Linear(1, 1), args=training_arguments(cfg, tmp_path, "accuracy"),
                      train_dataset=rows, eval_dataset=rows,
                      data_collator=lambda b: {"input_ids": torch.tensor([r["input_ids"] for r in b])})
    loader, orders = trainer.get_train_dataloader(), []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        orders.append([int(i) for batch in loader for i in batch["input_ids"][:, 0]])
    return orders


def test_each_seed_draws_its_own_epoch_orders(tmp_path):
    seed0, seed1 = (epoch_orders(tmp_path, [f"seed={s}"]) for s in (0, 1))
    assert seed0[0] != seed0[1] and sorted(seed0[0]) == list(range(24))
    assert seed1[0] != seed0[1] and seed1[0] != seed0[0]   # not seed 0's second epoch again
    # the runs before train.data_order: seed s shuffled epoch e as seed s + 1 shuffled epoch e - 1
    old0, old1 = (epoch_orders(tmp_path, [f"seed={s}", "train.data_order=epoch_offset"]) for s in (0, 1))
    assert old1[0] == old0[1] and old0 == seed0                 # seed 0 is the same either way
