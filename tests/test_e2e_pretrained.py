"""End to end with the real pretrained backbones (MiniLM on real CLINC150 data, SmolLM2 from GGUF); slow."""
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
    record = run(cfg, tmp / "run").to_dict()
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


def test_smollm2_from_gguf_is_a_trainable_classifier():
    """The GGUF decoder dequantizes to a plain fp32 model that the Trainer accepts, with a pad token."""
    from transformers.trainer_utils import validate_quantization_for_training

    from sparsetune_cli.models import load_model, load_tokenizer
    cfg = compose(["backbone=smollm2-135m"])
    tok = load_tokenizer(cfg.backbone)
    model = load_model(cfg.backbone, 3, tok)
    validate_quantization_for_training(model)          # raises for a model still marked quantized
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    batch = tok(["book a flight", "what is my balance please"], padding=True, return_tensors="pt")
    out = model(**batch, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert out.logits.shape == (2, 3) and model.score.weight.grad is not None


def test_minilm_sparse_run_gives_the_same_metrics_with_and_without_the_frozen_bottom_cache(tmp_path, data_dir,
                                                                                             monkeypatch):
    from sparsetune_cli import bottom_cache
    from sparsetune_cli.train import run
    monkeypatch.setattr(bottom_cache, "cache_root", lambda: tmp_path / "cache")
    records = {}
    for cached in (True, False):
        cfg = compose(["task=intent", "method=sparse", f"data_dir={data_dir}", f"output_root={tmp_path}",
                       "task.train_limit=1000", "task.eval_limit=300", "train.epochs=1", "train.progress=false",
                       f"train.cache_bottom={cached}"])
        records[cached] = run(cfg, tmp_path / str(cached)).to_dict()
    assert records[True]["cost"]["cached_blocks"] == 4 and records[False]["cost"]["cached_blocks"] == 0
    for split in ("validation", "test"):   # the same predictions; the loss to float rounding of the batching
        on, off = records[True]["metrics"][split], records[False]["metrics"][split]
        assert {k: v for k, v in on.items() if k != "loss"} == {k: v for k, v in off.items() if k != "loss"}
        assert on["loss"] == pytest.approx(off["loss"], rel=1e-4)
