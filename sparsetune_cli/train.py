"""One run: data -> model -> method -> Hugging Face Trainer -> validation/test -> metrics.json."""
from __future__ import annotations

import csv
import json
import logging
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import SequentialSampler
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from .data import load_task, longest_first, tokenize, tokenized_cache_dir
from .errors import UserError
from .methods import count_params, get_method
from .methods.base import WEIGHTS, fp32_trainable
from .models import DTYPES, frozen_bottom, load_model, load_tokenizer
from .results import (METRICS_FILE, classification_metrics, completed_run, file_sha256, package_versions, read_metrics,
                      write_json_atomic)

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"

OPTIMIZERS = ("adamw_torch_fused", "adamw_torch")   # the same AdamW; fused is one kernel per step
SAMPLING = ("random", "group_by_length")        # the Trainer's train_sampling_strategy
LOGGERS = {"csv": "none", "none": "none", "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def validate_config(cfg) -> None:
    """Fail before any model is loaded, naming the key and the allowed range."""
    t, task, bb = cfg.train, cfg.task, cfg.backbone
    checks = [
        (t.epochs > 0 or t.max_steps > 0, "train.epochs", t.epochs, "> 0 (or set train.max_steps > 0)"),
        (t.max_steps == -1 or t.max_steps > 0, "train.max_steps", t.max_steps, "-1 (off) or > 0"),
        (t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1"),
        (t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size, ">= 1"),
        (t.grad_accum >= 1, "train.grad_accum", t.grad_accum, ">= 1"),
        (t.sampling in SAMPLING, "train.sampling", t.sampling, " or ".join(SAMPLING)),
        (cfg.method.lr > 0, "method.lr", cfg.method.lr, "> 0"),
        (t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0"),
        (0 <= t.warmup < 1 or (t.warmup >= 1 and float(t.warmup).is_integer()), "train.warmup", t.warmup,
         "a fraction in [0, 1) or a whole number of steps"),
        (t.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision", t.precision, "auto, fp32, bf16 or fp16"),
        ((bb.get("dtype") or "fp32") in DTYPES, "backbone.dtype", bb.get("dtype"), ", ".join(DTYPES)),
        (t.device in ("auto", "cpu", "cuda"), "train.device", t.device, "auto, cpu or cuda"),
        (t.logger in LOGGERS, "train.logger", t.logger, ", ".join(LOGGERS)),
        (t.optimizer in OPTIMIZERS, "train.optimizer", t.optimizer, ", ".join(OPTIMIZERS)),
        (t.eval_every == "epoch" or (isinstance(t.eval_every, int) and t.eval_every > 0), "train.eval_every",
         t.eval_every, "'epoch' or a number of steps > 0"),
        (8 <= task.max_length <= bb.max_positions, "task.max_length", task.max_length,
         f"8..{bb.max_positions} for backbone {bb.name}"),
        (task.get("train_limit") is None or task.train_limit >= 2, "task.train_limit", task.get("train_limit"),
         "null or >= 2"),
        (task.get("eval_limit") is None or task.eval_limit >= 1, "task.eval_limit", task.get("eval_limit"),
         "null or >= 1"),
        (task.get("class_weight") in (None, "balanced"), "task.class_weight", task.get("class_weight"),
         "null or balanced"),
    ]
    if cfg.method.name == "sparse":
        checks.append((0 < cfg.method.budget <= 1, "method.budget", cfg.method.budget, "(0, 1]"))
    for ok, key, value, allowed in checks:
        if not ok:
            raise UserError(f"{key}={value} is out of range: allowed {allowed}")
    cuda, precision = resolve_precision(t)
    if precision == "fp16" and not cuda:
        raise UserError("train.precision=fp16 needs a CUDA GPU (on the CPU it would silently run in fp32, with no "
                        "loss scaling); use train.precision=bf16 or fp32")
    if bb.get("dtype") == "bf16" and precision != "bf16":
        raise UserError(f"backbone.dtype=bf16 needs train.precision=bf16 (it resolves to {precision} here): a bf16 "
                        "backbone runs under bf16 autocast; or set backbone.dtype=fp32")


class CsvLogger(TrainerCallback):
    """Every logged value as a row (step, epoch, key, value) in log.csv; long format never needs a header rewrite."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "epoch", "key", "value"])
            for k, v in logs.items():
                w.writerow([state.global_step, state.epoch, k, v])


class RunGuard(TrainerCallback):
    """Stops cleanly on SIGTERM/SIGINT (saving a checkpoint to resume from) and on a non-finite loss;
    records wall time at each evaluation for time-to-best-score."""

    def __init__(self, seed: int):
        self.seed = seed
        self._step_calls = (-1, 0)  # (global step, micro-batch index within it)
        self.stop_signal: int | None = None
        self.bad_loss: str | None = None
        self.start = time.perf_counter()
        self.eval_times: dict[int, float] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        log.warning("received %s: saving a checkpoint, then stopping (send again to stop at once)",
                    signal.Signals(signum).name)
        self.stop_signal = signum

    def on_step_begin(self, args, state, control, **kwargs):
        # Dropout randomness is a function of (seed, step), not of the process history, so a run
        # resumed mid-epoch draws the same masks as an uninterrupted one (Trainer's own RNG restore
        # lands a few draws off).
        step, i = self._step_calls
        self._step_calls = (state.global_step, i + 1 if step == state.global_step else 0)
        torch.manual_seed((self.seed * 1_000_003 + state.global_step) * 64 + self._step_calls[1])

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_signal is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        # The Trainer ends a stopped epoch as a finished one, evaluating mid-epoch. That score would
        # enter the history and the best-checkpoint choice, which an uninterrupted run never sees.
        if self.stop_signal is not None and abs(state.epoch - round(state.epoch)) > 1e-6:
            control.should_evaluate = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            self.bad_loss = f"loss became {loss} at step {state.global_step}; lower method.lr or check the data"
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, **kwargs):
        self.eval_times[state.global_step] = time.perf_counter() - self.start

    @staticmethod
    def restore_default_handlers():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)


class SparsetuneTrainer(Trainer):
    def _get_eval_sampler(self, eval_dataset):
        # Evaluate in the given (longest-first) order. Under train.sampling=group_by_length the Trainer
        # would group evaluation batches too, at random: on 1,000 rows that pads 3x more.
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None


def resolve_precision(t) -> tuple[bool, str]:
    """(use CUDA, precision): train.precision=auto is bf16 on a CUDA GPU that has it, fp16 on an older one,
    fp32 on the CPU."""
    cuda = torch.cuda.is_available() and t.device != "cpu"
    if t.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if t.precision != "auto":
        return cuda, t.precision
    return cuda, ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"


def training_arguments(cfg, run_dir: Path, headline: str) -> TrainingArguments:
    t = cfg.train
    cuda, precision = resolve_precision(t)
    by_epoch = t.eval_every == "epoch"
    return TrainingArguments(
        output_dir=str(run_dir / CHECKPOINTS),
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        train_sampling_strategy=t.sampling,
        learning_rate=cfg.method.lr, weight_decay=t.weight_decay, lr_scheduler_type=t.scheduler,
        warmup_steps=float(t.warmup) if t.warmup < 1 else int(t.warmup),  # a float below 1 is a ratio
        max_grad_norm=t.max_grad_norm, optim=t.optimizer,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not cuda,
        eval_strategy="epoch" if by_epoch else "steps", save_strategy="epoch" if by_epoch else "steps",
        eval_steps=None if by_epoch else t.eval_every, save_steps=None if by_epoch else t.eval_every,
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model=headline, greater_is_better=True,
        logging_steps=t.logging_steps, logging_first_step=True, report_to=LOGGERS[t.logger],
        disable_tqdm=not t.progress, seed=cfg.seed, data_seed=cfg.seed, full_determinism=bool(t.deterministic),
        dataloader_num_workers=t.num_workers, label_names=["labels"],
        logging_nan_inf_filter=False,  # a NaN loss must reach RunGuard, not be averaged away
    )


def class_weighted_loss(train_labels, num_labels: int):
    """task.class_weight=balanced: cross-entropy weighted by inverse class frequency in train (scikit-learn's
    'balanced'), so that a rare class is not learned away. Returns (loss for Trainer's compute_loss_func, weights).
    The loss is summed and divided by the number of labels, the Trainer's convention under gradient accumulation."""
    from sklearn.utils.class_weight import compute_class_weight
    y = np.asarray(train_labels)
    present = np.unique(y[y >= 0])
    weights = np.ones(num_labels)
    weights[present] = compute_class_weight("balanced", classes=present, y=y[y >= 0])
    weights = torch.tensor(weights, dtype=torch.float32)

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"].float()
        total = torch.nn.functional.cross_entropy(logits, labels, weight=weights.to(logits.device), reduction="sum")
        return total / (num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum())
    return loss, weights


def prepare_model(cfg, method, model, context: dict):
    """The method's prepare, then train.frozen_dropout=false: the frozen bottom (embeddings and the blocks
    below the lowest trainable one) stays in eval mode, although the Trainer calls model.train() each step."""
    model = fp32_trainable(method.prepare(model, context=context))
    if not cfg.train.frozen_dropout:
        for _, module in frozen_bottom(model):
            module.register_forward_pre_hook(_stay_in_eval)
    return model


def _stay_in_eval(module, args) -> None:
    if module.training:
        module.eval()


def method_context(cfg, data, datasets, tokenizer, run_dir: Path | None = None) -> dict:
    """What Method.prepare gets for a new run: the sparse method mines and probes from it."""
    return {"train": datasets["train"], "rows": data.splits["train"], "collator": DataCollatorWithPadding(tokenizer),
            "cfg": cfg, "tokenizer": tokenizer, "labels": data.labels, "run_dir": run_dir}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def base_record(cfg) -> dict:
    return {"status": "running", "task": cfg.task.name, "backbone": cfg.backbone.name, "method": cfg.method.name,
            "seed": cfg.seed, "headline_metric": cfg.task.headline_metric,
            "config": OmegaConf.to_container(cfg, resolve=True), "versions": package_versions()}


def is_main_process() -> bool:
    """Under torchrun or accelerate (DDP) every rank runs this code; only rank 0 writes results."""
    return int(os.environ.get("RANK", "0")) == 0


def run(cfg, run_dir: Path) -> dict:
    """Train, evaluate and record one run in run_dir. Skips a completed run; resumes an interrupted one."""
    validate_config(cfg)
    done = completed_run(cfg, run_dir)
    if done:
        return done
    previous = read_metrics(run_dir)
    main = is_main_process()
    if main and cfg.force and (run_dir / CHECKPOINTS).exists():
        shutil.rmtree(run_dir / CHECKPOINTS)
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.train.threads:
        torch.set_num_threads(int(cfg.train.threads))
    record = base_record(cfg)
    cuda, record["precision"] = resolve_precision(cfg.train)
    record["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    record["variant"] = run_dir.parent.name   # the overrides that name this run (e.g. method.lr=0.001)

    def write(rec: dict) -> None:
        if main:
            write_json_atomic(run_dir / METRICS_FILE, rec)

    guard = RunGuard(cfg.seed)
    try:
        record = _train_and_evaluate(cfg, run_dir, record, guard, previous, main)
    except Exception as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            e = UserError(f"out of GPU memory: lower train.batch_size (now {cfg.train.batch_size}, raise "
                          f"train.grad_accum to keep the effective batch) or task.max_length (now {cfg.task.max_length})")
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        write(record)
        raise e
    except KeyboardInterrupt:
        record.update(status="interrupted", error="interrupted before a checkpoint could be saved")
        write(record)
        raise
    finally:
        RunGuard.restore_default_handlers()
        if cfg.train.deterministic:   # process-wide: a later run in this process (tests, sweeps) chooses again
            torch.use_deterministic_algorithms(False)
    write(record)
    return record


def _train_and_evaluate(cfg, run_dir: Path, record: dict, guard: RunGuard, previous: dict | None,
                        main: bool = True) -> dict:
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.backbone)
    data = load_task(cfg.task, cfg.data_dir, cfg.seed)
    datasets, truncated = tokenize(data, tokenizer, cfg.task.max_length, tokenized_cache_dir())
    for split in ("validation", "test"):   # scores do not depend on row order; padding does
        datasets[split] = longest_first(datasets[split])
    if main:
        (run_dir / "labels.json").write_text(json.dumps(data.labels))
    record["data"] = {"source": data.source, "num_labels": len(data.labels),
                      "sizes": {s: len(d) for s, d in datasets.items()}, "truncated": truncated}

    model = load_model(cfg.backbone, len(data.labels), tokenizer, cfg.seed)
    method = get_method(cfg.method)
    context = method_context(cfg, data, datasets, tokenizer, run_dir if main else None)
    collator = context["collator"]
    t0 = time.perf_counter()
    model = prepare_model(cfg, method, model, context)
    prepare_seconds = time.perf_counter() - t0

    positive = data.labels.index(str(cfg.task.positive_label)) if cfg.task.get("positive_label") is not None else None
    headline = cfg.task.headline_metric

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return classification_metrics(logits, pred.label_ids, positive)

    loss_func = None
    if cfg.task.get("class_weight"):
        loss_func, weights = class_weighted_loss(datasets["train"]["labels"], len(data.labels))
        record["data"]["class_weight"] = dict(zip(data.labels, (round(w, 4) for w in weights.tolist())))
    callbacks = [guard] + ([CsvLogger(run_dir / "log.csv")] if cfg.train.logger == "csv" else [])
    trainer = SparsetuneTrainer(model=model, args=training_arguments(cfg, run_dir, headline), data_collator=collator,
                                train_dataset=datasets["train"], eval_dataset=datasets["validation"],
                                processing_class=tokenizer, compute_metrics=compute_metrics, callbacks=callbacks,
                                compute_loss_func=loss_func)
    resume = get_last_checkpoint(str(run_dir / CHECKPOINTS)) if (run_dir / CHECKPOINTS).is_dir() else None
    if resume:
        log.info("resuming from %s", resume)
    earlier = (previous or {}).get("cost", {}) if resume else {}   # time spent before the interruption
    start_step = int(resume.rsplit("-", 1)[-1]) if resume else 0

    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - t0   # includes the per-epoch validation passes
    steps = trainer.state.global_step
    record["cost"] = {"train_seconds": seconds + earlier.get("train_seconds", 0.0),
                      "seconds_per_step": seconds / max(1, steps - start_step), "steps": steps,
                      "prepare_seconds": prepare_seconds + earlier.get("prepare_seconds", 0.0),
                      **count_params(model), **method.cost_extra()}
    if guard.bad_loss:
        raise FloatingPointError(guard.bad_loss)
    if guard.stop_signal is not None:
        record.update(status="interrupted", error=f"stopped by {signal.Signals(guard.stop_signal).name}; "
                                                  "rerun the same command to resume")
        record["cost"].update(peak_memory_mb=peak_memory_mb(),
                              wall_seconds=time.perf_counter() - guard.start + earlier.get("wall_seconds", 0.0))
        return record

    t0 = time.perf_counter()
    metrics = {}
    # The best checkpoint, loaded at the end, had its validation scores logged when it was chosen:
    # reuse them rather than run that pass again.
    logged = {e["step"]: e for e in trainer.state.log_history if f"eval_{headline}" in e}
    best = logged.get(trainer.state.best_global_step)
    for split in ("validation", "test"):
        if split == "validation" and best is not None:
            res, prefix = best, "eval_"
        else:
            res, prefix = trainer.evaluate(datasets[split], metric_key_prefix=split), f"{split}_"
        metrics[split] = {k[len(prefix):]: v for k, v in res.items()
                          if k.startswith(prefix) and k[len(prefix):] in ("accuracy", "macro_f1", "f1", "loss")}
    record["metrics"] = metrics
    record["cost"]["eval_seconds"] = time.perf_counter() - t0   # the final test pass (and validation if not logged)
    record["history"] = [{"step": step, "epoch": e.get("epoch"), headline: e[f"eval_{headline}"],
                          "seconds": guard.eval_times.get(step)} for step, e in logged.items()]
    record["cost"]["world_size"] = trainer.args.world_size   # > 1 under DDP (torchrun)
    if not main:
        return record
    model_dir = run_dir / MODEL_DIR
    method.save(trainer.model, model_dir)
    record["weights_sha256"] = file_sha256(model_dir / WEIGHTS)
    record["cost"].update(peak_memory_mb=peak_memory_mb(), checkpoint_mb=dir_mb(model_dir),
                          total_seconds=record["cost"]["train_seconds"] + record["cost"]["prepare_seconds"],
                          # everything from the start of the command: loading, tokenizing, mining, probe,
                          # training, evaluation and saving (plus any time before an interruption)
                          wall_seconds=time.perf_counter() - guard.start + earlier.get("wall_seconds", 0.0))
    if not cfg.train.keep_checkpoints:
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    record["status"] = "completed"
    log.info("%s %s %s seed %s: test %s", cfg.task.name, cfg.backbone.name, cfg.method.name, cfg.seed,
             metrics["test"])
    return record
