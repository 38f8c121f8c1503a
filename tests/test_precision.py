"""Mixed precision: every method trains, evaluates, saves, reloads, predicts and merges under bf16 CPU
autocast as under fp32, on both tiny backbones; the sparse op's gradients under autocast match fp32; a bf16
backbone keeps what trains in fp32."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from conftest import run_tiny
from sparsetune_cli.errors import UserError
from sparsetune_cli.methods import METHODS
from sparsetune_cli.methods.base import WEIGHTS
from sparsetune_cli.methods.sparse import DeltaLinear
from sparsetune_cli.predict import inference_autocast, load_run, merge, predict

SHORT = ["task=trec", "task.train_limit=64", "task.eval_limit=32", "train.max_steps=3", "train.device=cpu",
         "train.batch_size=16"]
TEXTS = ["what is the capital of peru ?", "who wrote hamlet ?", "how many feet are in a mile ?"]
# Merged vs unmerged logits under bf16 autocast: the same bf16 matmuls except that LoRA's adapter path is
# rounded separately before the sum; 8 mantissa bits give ~0.4% per op, the logits of a 2-block model stay
# within 3e-2 of each other. Under fp32 the two agree to float rounding.
TOLERANCE = {"fp32": dict(rtol=1e-5, atol=1e-5), "bf16": dict(rtol=3e-2, atol=3e-2)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("backbone", ["tiny-encoder", "tiny-decoder"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_the_whole_path_at_each_precision(method, backbone, precision, data_dir, tmp_path):
    record, run_dir = run_tiny(tmp_path, [f"backbone={backbone}", f"method={method}", f"data_dir={data_dir}",
                                          f"train.precision={precision}", *SHORT])
    assert record["status"] == "completed" and record["precision"] == precision
    assert all(torch.isfinite(torch.tensor(v)) for v in record["metrics"]["test"].values())
    saved = load_file(str(run_dir / "model" / WEIGHTS))
    assert saved and all(t.dtype == torch.float32 for t in saved.values()), "what trains is saved as fp32"

    run = load_run(run_dir)
    probs = predict(run, TEXTS)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(TEXTS)))
    batch = run.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        unmerged = run.model(**batch).logits.float()
        if method == "prefix":
            with pytest.raises(UserError, match="cannot be merged"):
                merge(run, tmp_path / "merged")
            return
        merge(run, tmp_path / "merged")
        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        merged = plain(**batch).logits.float()
    torch.testing.assert_close(merged, unmerged, **TOLERANCE[precision])


def _op_grads(dtype):
    """Gradients of the sparse op and of a plain linear layer with the same patched weight, under autocast
    at `dtype` (None: fp32)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48)
    layer = DeltaLinear(base, torch.tensor([1, 7, 20, 33]))
    with torch.no_grad():
        layer.delta.normal_(std=0.05)
    x = torch.randn(4, 16, 64, requires_grad=True)
    g = torch.randn(4, 16, 48)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        y = layer(x)
    gx, gd = torch.autograd.grad(y, (x, layer.delta), g.to(y.dtype))
    return y, gx, gd


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse_op_under_autocast_matches_fp32_gradients(dtype):
    y32, gx32, gd32 = _op_grads(None)
    y, gx, gd = _op_grads(dtype)
    assert y.dtype == dtype, "the op computes in autocast's dtype, as nn.Linear does"
    assert gx.dtype == torch.float32 and gd.dtype == torch.float32, "gradients come back in the inputs' dtypes"
    # Stated tolerance: relative error (Frobenius norm) of the delta's gradient under 1% in bf16 (measured
    # ~0.3%), under 0.1% in fp16 (measured ~0.04%); the input gradient likewise.
    limit = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert (gd - gd32).norm() / gd32.norm() < limit
    assert (gx - gx32).norm() / gx32.norm() < limit


@pytest.mark.parametrize("backbone", ["tiny-encoder", "tiny-decoder"])
@pytest.mark.parametrize("method", ["sparse", "lora"])
def test_bf16_backbone_trains_fp32_deltas_and_adapters(method, backbone, data_dir, tmp_path):
    record, run_dir = run_tiny(tmp_path, [f"backbone={backbone}", f"method={method}", f"data_dir={data_dir}",
                                          "backbone.dtype=bf16", "train.precision=bf16", *SHORT])
    assert record["status"] == "completed"
    run = load_run(run_dir)
    dtypes = {n: p.dtype for n, p in run.model.named_parameters()}
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and all(dtypes[n] == torch.float32 for n in trainable)
    frozen = [dtypes[n] for n in dtypes if n not in trainable]
    assert frozen and all(d == torch.bfloat16 for d in frozen), "the frozen backbone stays bf16"
    assert all(t.dtype == torch.float32 for t in load_file(str(run_dir / "model" / WEIGHTS)).values())
    probs = predict(run, TEXTS)
    assert torch.isfinite(probs).all()
    with torch.no_grad(), inference_autocast(run.cfg.backbone):
        unmerged = run.model(**run.tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.float()
    merge(run, tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype="auto").eval()
    assert next(plain.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        merged = plain(**run.tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.float()
    torch.testing.assert_close(merged, unmerged, **TOLERANCE["bf16"])


@pytest.mark.parametrize("overrides,match", [
    (["backbone.dtype=bf16"], "backbone.dtype=bf16 needs train.precision=bf16"),
    (["backbone.dtype=fp8", "train.precision=bf16"], "backbone.dtype"),
    (["train.precision=fp16", "train.device=cpu"], "fp16 needs a CUDA GPU"),
])
def test_precision_settings_that_cannot_work_are_refused_in_one_line(overrides, match):
    from conftest import compose
    from sparsetune_cli.config import validate_config, validate_precision
    cfg = compose(["backbone=tiny-encoder", *overrides])
    with pytest.raises(UserError, match=match):
        validate_config(cfg)      # types and ranges: before a sweep skips a finished run
        validate_precision(cfg)   # against this machine: when a run starts


def test_deterministic_switch_repeats_a_run_and_is_undone_after_it(data_dir, tmp_path):
    records = [run_tiny(tmp_path / str(i), ["method=sparse", f"data_dir={data_dir}", "train.deterministic=true",
                                            "train.precision=bf16", *SHORT])[0] for i in range(2)]
    assert records[0]["metrics"] == records[1]["metrics"]
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"]
    assert not torch.are_deterministic_algorithms_enabled(), "the process-wide switch is reset after the run"


def test_gpu_check_checks_nothing_without_cuda_and_runs_its_cases_where_allowed(tmp_path, data_dir):
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_check.md"
    plain = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(out)], cwd=repo,
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and plain.stdout.strip() == "no CUDA device: nothing checked"
    assert not out.exists(), "no report is written: nothing checked is never a pass"
    # The same cases on the CPU (tiny backbone): what a GPU machine runs, minus the device
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--allow-cpu", "--backbone", "tiny-encoder",
                           "--steps", "2", "--workers", "2", "--data-dir", str(data_dir), "--out", str(out),
                           "--cases", "bf16/lora,fp16/full,sweep/parallel"], cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = out.read_text()
    assert "| bf16/lora | pass | tiny-encoder | bf16 |" in report
    assert "| fp16/full | skipped |" in report and "| sweep/parallel | pass |" in report
    assert "on **cpu**" in report and "torch 2." in report
