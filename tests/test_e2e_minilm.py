"""End to end with the real MiniLM on real CLINC150 data (slow: about two minutes on 2 CPU cores)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import compose

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_sparse_run(tmp_path_factory, data_dir):
    from sparsetune_cli.train import run
    tmp = tmp_path_factory.mktemp("minilm")
    cfg = compose(["task=intent", "method=sparse", f"data_dir={data_dir}", f"output_root={tmp}",
                   "task.train_limit=3000", "task.eval_limit=900", "train.epochs=1", "train.progress=false"])
    record = run(cfg, tmp / "run")
    return record, tmp / "run"


def test_sparse_minilm_learns_intents(minilm_sparse_run):
    record, _ = minilm_sparse_run
    assert record["status"] == "completed"
    assert record["metrics"]["test"]["accuracy"] > 0.5          # chance is 1/150
    assert record["cost"]["trainable_params_without_head"] <= 0.01 * 22_565_376


def test_predict_labels_a_balance_question(minilm_sparse_run):
    from sparsetune_cli.predict import load_run, predict
    _, run_dir = minilm_sparse_run
    run = load_run(run_dir)
    probs = predict(run, ["what is my bank balance"])
    assert "balance" in run.labels[int(probs[0].argmax())]


def test_merged_minilm_matches_the_sparse_model(minilm_sparse_run, tmp_path):
    from sparsetune_cli.predict import load_run, merge
    _, run_dir = minilm_sparse_run
    run = load_run(run_dir)
    batch = run.tokenizer(["please book a table for two", "what is my bank balance"], padding=True,
                          return_tensors="pt")
    with torch.no_grad():
        expected = run.model(**batch).logits
    merge(run, tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-4, atol=1e-4)
