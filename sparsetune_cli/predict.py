"""Use a finished run: rebuild its model from the run folder, label texts, export a plain HF model."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .errors import UserError
from .formats import encode, parse_input
from .methods import get_method
from .methods.base import WEIGHTS
from .models import backbone_dtype, load_model, load_tokenizer
from .record import CONFIG_FILE, LABELS_FILE, MODEL_DIR, file_sha256, read_record


@dataclass
class LoadedRun:
    cfg: object
    labels: list[str]
    tokenizer: object
    model: torch.nn.Module
    method: object


def load_run(run_dir: Path) -> LoadedRun:
    record = read_record(run_dir)
    if record is None or record.status != "completed":
        raise UserError(f"{run_dir}: not a completed run (no metrics.json with status completed)")
    weights = run_dir / MODEL_DIR / WEIGHTS
    if not weights.is_file():
        raise UserError(f"{weights}: missing; the run's trained weights were deleted or moved")
    expected = record.weights_sha256
    if expected and file_sha256(weights) != expected:
        raise UserError(f"{weights}: does not match the checksum the run recorded; the file was changed or replaced")
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    labels = json.loads((run_dir / LABELS_FILE).read_text())
    tokenizer = load_tokenizer(cfg.backbone)
    model = load_model(cfg.backbone, len(labels), tokenizer, cfg.seed)
    method = get_method(cfg.method)
    model = method.load(model, run_dir / MODEL_DIR)
    model.eval()
    return LoadedRun(cfg, labels, tokenizer, model, method)


@torch.no_grad()
def predict(run: LoadedRun, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Class probabilities, one row per input, in input order. Batches go longest first, so that each
    pads to about its own inputs' length."""
    inputs = [parse_input(run.cfg.task, t) for t in texts]
    if not inputs:
        return torch.empty(0, len(run.labels))
    enc = encode(run.tokenizer, inputs, run.cfg.task.max_length)
    keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    order = sorted(range(len(inputs)), key=lambda i: -len(enc["input_ids"][i]))
    probs = torch.empty(len(inputs), len(run.labels))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = run.tokenizer.pad({k: [enc[k][i] for i in rows] for k in keep}, return_tensors="pt")
        with inference_autocast(run.cfg.backbone):
            probs[rows] = torch.softmax(run.model(**batch).logits.float(), -1)
    return probs


def inference_autocast(backbone, device: str = "cpu"):
    """A bf16 backbone (backbone.dtype=bf16) with fp32 trained parts runs under bf16 autocast, as in training;
    an fp32 one in plain fp32, whatever precision it trained under."""
    return torch.autocast(device, dtype=torch.bfloat16, enabled=backbone_dtype(backbone) == torch.bfloat16)


def format_predictions(run: LoadedRun, probs: torch.Tensor, texts: list[str], as_json=False, top: int = 3) -> list[str]:
    lines = []
    for text, p in zip(texts, probs):
        if not as_json:
            lines.append(run.labels[int(p.argmax())])
            continue
        values, idx = p.topk(min(top, len(run.labels)))
        lines.append(json.dumps({"text": text, "label": run.labels[int(idx[0])],
                                 "probabilities": {run.labels[int(i)]: round(float(v), 6) for v, i in zip(values, idx)}}))
    return lines


def merge(run: LoadedRun, out_dir: Path) -> None:
    """A plain Hugging Face model folder with the base architecture: no sparsetune code needed to load it. Written
    beside out_dir and renamed into place, so out_dir never holds a mix of old and new files."""
    import shutil
    import tempfile
    model = run.method.export(run.model).to(backbone_dtype(run.cfg.backbone))   # one dtype in the folder
    model.config.id2label = dict(enumerate(run.labels))
    model.config.label2id = {name: i for i, name in enumerate(run.labels)}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        model.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
