"""One real (tiny-model) run end to end through the CLI: result schema, skip/resume, table, predict."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY

BIN = Path(sys.executable).parent / "sparsetune"


def cli(*args, check=True, **kw):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, check=check, timeout=600, **kw)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs")
    args = ["run", "backbone=tiny-encoder", "method=full", f"output_root={out}", f"data_dir={data_dir}", *TINY]
    proc = cli(*args)
    runs = list(out.rglob("metrics.json"))
    assert len(runs) == 1, proc.stderr[-2000:]
    return runs[0].parent, args


def test_result_schema(finished_run):
    run_dir, _ = finished_run
    rec = json.loads((run_dir / "metrics.json").read_text())
    assert rec["status"] == "completed"
    assert (rec["task"], rec["backbone"], rec["method"], rec["seed"]) == ("intent", "tiny-encoder", "full", 0)
    for split in ("validation", "test"):
        assert {"accuracy", "macro_f1"} <= set(rec["metrics"][split])
        assert 0 <= rec["metrics"][split]["accuracy"] <= 1
    cost = rec["cost"]
    for key in ("train_seconds", "seconds_per_step", "trainable_params", "total_params", "peak_memory_mb",
                "checkpoint_mb"):
        assert cost[key] > 0, key
    assert cost["trainable_params"] == cost["total_params"]            # full finetuning trains everything
    assert cost["cpu_count"] >= 1 and cost["threads"] >= 1 and cost["load_average"] >= 0   # what else ran
    assert 1 <= cost["usable_cpus"] <= cost["cpu_count"]
    assert cost["cpu"].endswith(")") and "(" in cost["cpu"]           # model (instruction set): where it repeats
    assert {"python", "torch", "transformers", "peft", "datasets", "sparsetune", "git_commit"} <= set(rec["versions"])
    assert rec["config"]["train"]["epochs"] == 1 and rec["config"]["seed"] == 0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "log.csv").is_file()
    assert not (run_dir / "checkpoints").exists()                      # pruned after completion
    assert rec["history"] and rec["history"][-1]["step"] == cost["steps"]


def test_run_folder_is_a_function_of_the_config(finished_run):
    run_dir, _ = finished_run
    parts = run_dir.parts
    assert parts[-5:-2] == ("intent", "tiny-encoder", "full") and parts[-1] == "seed0"


def test_rerunning_a_completed_run_skips_it(finished_run):
    run_dir, args = finished_run
    before = (run_dir / "metrics.json").read_text()
    proc = cli(*args)
    assert "already completed" in proc.stdout + proc.stderr
    assert (run_dir / "metrics.json").read_text() == before


def test_table_prints_and_writes_csv(finished_run):
    run_dir, _ = finished_run
    root = run_dir.parents[4]
    proc = cli("table", str(root))
    assert "| full" in proc.stdout and "intent" in proc.stdout and "(n=1)" in proc.stdout
    assert (root / "comparison.csv").is_file()


def test_predict_labels_texts(finished_run):
    run_dir, _ = finished_run
    labels = json.loads((run_dir / "labels.json").read_text())
    proc = cli("predict", str(run_dir), "what is my bank balance", "book a flight")
    assert [line in labels for line in proc.stdout.splitlines()] == [True, True]
    proc = cli("predict", str(run_dir), "--json", input="hello there\n")
    out = json.loads(proc.stdout)
    assert out["label"] in labels and len(out["probabilities"]) == 3            # --top 3 by default
    assert max(out["probabilities"].values()) == out["probabilities"][out["label"]]


def test_saved_model_reproduces_the_recorded_scores(tmp_path, data_dir):
    # Validation scores are the ones logged when the best checkpoint was chosen (not a second pass) and test
    # is scored longest-first: the saved model, predicting each split in file order, must agree with both.
    import torch

    from conftest import run_tiny
    from sparsetune_cli.data import load_task
    from sparsetune_cli.predict import load_run, predict
    # (frozen_dropout=true: a seed-0 run whose best checkpoint comes before the last)
    rec, run_dir = run_tiny(tmp_path, ["method=sparse", "task=trec", "task.coarse=true", f"data_dir={data_dir}",
                                       "method.lr=0.03", "train.epochs=2", "train.eval_every=3",
                                       "train.frozen_dropout=true"])
    history = [h["accuracy"] for h in rec["history"]]
    assert len(history) >= 4 and history[-1] < max(history)   # the best checkpoint is not the last one
    assert rec["metrics"]["validation"]["accuracy"] == max(history)
    run = load_run(run_dir)
    data = load_task(run.cfg.task, run.cfg.data_dir, run.cfg.seed)
    for split in ("validation", "test"):
        rows = data.splits[split]
        probs = predict(run, [r["text"] for r in rows])
        assert torch.allclose(predict(run, [r["text"] for r in rows[::-1]], batch_size=7), probs.flip(0), atol=1e-5)
        predicted = probs.argmax(-1).tolist()
        accuracy = sum(run.labels[p] == r["label"] for p, r in zip(predicted, rows)) / len(rows)
        assert accuracy == pytest.approx(rec["metrics"][split]["accuracy"], abs=1e-9), split


def test_predict_refuses_a_changed_weights_file(finished_run, tmp_path):
    import shutil
    run_dir, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    with open(copy / "model" / "trained.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x00\x01")
    proc = cli("predict", str(copy), "hello", check=False)
    assert proc.returncode == 2 and "does not match the checksum" in proc.stderr


def test_bad_config_fails_in_one_line_before_loading(tmp_path):
    proc = cli("run", "backbone=tiny-encoder", f"output_root={tmp_path}", "train.batch_size=0", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "sparsetune: error: train.batch_size=0 is out of range: allowed >= 1"


def test_an_unknown_experiment_fails_and_runs_nothing(tmp_path):
    # Hydra skipped a missing `optional` group option, so a typo ran the defaults in its own folder
    proc = cli("run", "backbone=tiny-encoder", f"output_root={tmp_path}", "experiment=paper_cpuu", check=False)
    assert proc.returncode != 0 and "Could not find 'experiment/paper_cpuu'" in proc.stderr
    assert not list(tmp_path.rglob("*"))


def test_class_weighted_loss_is_the_balanced_weighted_cross_entropy():
    import torch
    from sparsetune_cli.train import class_weighted_loss
    loss, weights = class_weighted_loss([0, 0, 0, 1], num_labels=3)   # class 2 never seen in train: weight 1
    assert torch.allclose(weights, torch.tensor([4 / 6, 4 / 2, 1.0]))
    logits, labels = torch.randn(5, 3), torch.tensor([0, 1, 1, 2, -100])
    per_example = torch.nn.functional.cross_entropy(logits[:4], labels[:4], reduction="none")
    expected = (per_example * weights[labels[:4]]).sum() / 4   # -100 (unseen label) is ignored
    assert torch.allclose(loss({"logits": logits}, labels), expected)
    assert torch.allclose(loss({"logits": logits}, labels, num_items_in_batch=8), expected * 4 / 8)


def test_balanced_class_weight_trains_and_is_recorded(tmp_path, data_dir):
    from conftest import run_tiny
    record, _ = run_tiny(tmp_path, [f"data_dir={data_dir}", "task=entity_matching", "task.class_weight=balanced",
                                    "method=full", "train.max_steps=3"])
    assert record["status"] == "completed"
    w = record["data"]["class_weight"]
    # about 10% matches in Abt-Buy: the match class weighs about 9x the other
    assert set(w) == {"0", "1"} and 6 < w["1"] / w["0"] < 12


def test_group_by_length_sampling_pads_less_than_random_and_keeps_evaluation_longest_first(tmp_path, data_dir):
    from transformers import DataCollatorWithPadding

    from conftest import compose
    from sparsetune_cli.data import load_task, longest_first, tokenize
    from sparsetune_cli.models import load_model, load_tokenizer
    from sparsetune_cli.train import SparsetuneTrainer, training_arguments
    padded = {}
    for sampling in ("random", "group_by_length"):
        cfg = compose(["backbone=tiny-encoder", "task=srl", f"data_dir={data_dir}", "task.train_limit=640",
                       "task.eval_limit=300", f"train.sampling={sampling}"])
        tok = load_tokenizer(cfg.backbone)
        data = load_task(cfg.task, cfg.data_dir)
        ds, _ = tokenize(data, tok, cfg.task.max_length)
        trainer = SparsetuneTrainer(model=load_model(cfg.backbone, len(data.labels), tok), train_dataset=ds["train"],
                                    eval_dataset=longest_first(ds["validation"]),
                                    args=training_arguments(cfg, tmp_path / sampling, "accuracy"),
                                    data_collator=DataCollatorWithPadding(tok))
        batches = list(trainer.get_train_dataloader())
        assert sum(len(b["labels"]) for b in batches) == 640          # every row once per epoch
        padded[sampling] = sum(b["input_ids"].numel() for b in batches)
        widths = [b["input_ids"].shape[1] for b in trainer.get_eval_dataloader()]
        assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1], (sampling, widths)
    assert padded["group_by_length"] < 0.8 * padded["random"], padded


def test_bench_quick_writes_every_method_as_a_ratio_to_full(tmp_path, data_dir):
    out = tmp_path / "bench"
    subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--backbone", "tiny-encoder", "--methods",
                    "full,sparse,lora,prefix,head_only_cached,full_bf16", "--out", str(out)], check=True,
                   capture_output=True, timeout=300,
                   cwd=Path(__file__).resolve().parents[1], env={**os.environ, "SPARSETUNE_DATA_DIR": str(data_dir)})
    result = json.loads(out.with_suffix(".json").read_text())
    train = result["train"]
    assert set(train) == {"full", "sparse", "lora", "prefix", "head_only_cached", "full_bf16", "forward_only"}
    assert train["full"]["step_ratio"] == 1
    assert (train["full_bf16"]["precision"], train["full"]["precision"]) == ("bf16", "fp32")
    assert all(r["step_seconds"] > 0 and r["step_ratio"] > 0 for r in train.values())
    assert train["sparse"]["optimizer_state_bytes"] < train["full"]["optimizer_state_bytes"] / 10
    assert set(result["inference_ratio_to_base"]) == {"base", "sparse_merged", "lora_unmerged", "lora_merged",
                                                      "prefix"}
    assert "| sparse |" in out.with_suffix(".md").read_text()
    assert "`full_bf16` is full with train.precision=bf16" in out.with_suffix(".md").read_text()


def test_bench_rows_take_their_precision_from_the_composed_config(data_dir):
    """A row trains in its config's train.precision (a _bf16 variant's, or one --override sets for every row); the
    default, auto, means --precision. The autocast it gets is that dtype."""
    import argparse
    import importlib.util

    import torch
    spec = importlib.util.spec_from_file_location("bench", Path(__file__).resolve().parents[1] / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(backbone="tiny-encoder", task="intent", batch_size=2, seq_len=8, batches=1, device="cpu",
                              override=[f"data_dir={data_dir}"])
    assert [bench.build(args, m).precision for m in ("full_bf16", "sparse_bf16", "full")] == ["bf16", "bf16", "fp32"]
    args.override.append("train.precision=bf16")
    assert bench.build(args, "full").precision == "bf16"
    with bench.autocast("bf16"):
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16
    with bench.autocast("fp32"):
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.float32


def test_bench_runs_render_rewrites_the_committed_page_from_its_json(tmp_path):
    """`bench_runs.py --render` rebuilds the markdown from the json alone, each column at one precision: 0.920
    beside 0.919, never 0.92. The committed page is what it renders."""
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "b.json").write_text((repo / "results" / "bench_runs.json").read_text())
    subprocess.run([sys.executable, "scripts/bench_runs.py", "--render", "--out", str(tmp_path / "b")], cwd=repo,
                   check=True, capture_output=True, timeout=120)
    page = (tmp_path / "b.md").read_text()
    assert page == (repo / "results" / "bench_runs.md").read_text()
    rows = [line.split("|")[1:-1] for line in page.splitlines() if line.startswith("| sparse lr=0.001")]
    assert [cell.strip() for cell in rows[0]][-2:] == ["0.915", "0.920"]


def test_patience_stops_a_run_whose_validation_score_stops_improving(tmp_path, data_dir):
    """At a learning rate too small to change any prediction the validation score never improves: patience 1
    ends the run after its second evaluation of 6 epochs, and the first (best) checkpoint is what is scored."""
    from conftest import run_tiny
    record, _ = run_tiny(tmp_path, ["method=full", "method.lr=1e-12", f"data_dir={data_dir}", "train.epochs=6",
                                    "train.patience=1"])
    history = record["history"]
    assert record["status"] == "completed" and [h["epoch"] for h in history] == [1.0, 2.0]
    assert record["metrics"]["validation"]["accuracy"] == history[0]["accuracy"]
