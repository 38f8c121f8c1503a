"""One run, top to bottom: check the config, own the folder, load data and model, let the method prepare it,
train with the Hugging Face Trainer, evaluate on validation and test, save, and record it all in metrics.json."""
from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import SequentialSampler
from transformers import DataCollatorWithPadding, EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

from . import bottom_cache
from .callbacks import CsvLogger, EvalClock, ReseedEachStep, StopOnNonFiniteLoss, StopOnSignal
from .config import DATA_ORDERS, LOGGERS, resolve_precision, validate_config, validate_precision
from .data import load_task, longest_first, tokenize, tokenized_cache_dir
from .errors import UserError
from .methods import MethodContext, count_params, get_method
from .methods.base import WEIGHTS, fp32_trainable
from .models import frozen_bottom, load_model, load_tokenizer
from .record import (CHECKPOINTS, CONFIG_FILE, LABELS_FILE, LOG_FILE, MODEL_DIR, RunLock, RunRecord,
                     checkpoint_step, classification_metrics, cpu_model, file_sha256, finished_run,
                     last_good_checkpoint, read_record, same_config, usable_cpus)

log = logging.getLogger(__name__)


def run(cfg, run_dir: Path) -> RunRecord:
    """Train, evaluate and record one run in run_dir. Skips a finished run; resumes an interrupted one."""
    validate_config(cfg)
    validate_precision(cfg)
    method = get_method(cfg.method)   # the method's own options, checked before anything is loaded
    main = is_main_process()
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir) if main else _no_lock():
        done = finished_run(cfg, run_dir, lambda: load_task(cfg.task, cfg.data_dir, cfg.seed).fingerprint,
                            method.option_defaults)
        if done:
            return done
        previous = read_record(run_dir)
        if previous is not None and not cfg.force and (run_dir / CHECKPOINTS).exists():   # they would be resumed
            article = "an" if previous.status[0] in "aeiou" else "a"
            same_config(previous, cfg, run_dir, f"checkpoints of {article} {previous.status} run",
                        method.option_defaults)
        if main and cfg.force and (run_dir / CHECKPOINTS).exists():
            shutil.rmtree(run_dir / CHECKPOINTS)
        if main:
            (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if cfg.train.threads:
            torch.set_num_threads(int(cfg.train.threads))
        cuda, precision = resolve_precision(cfg.train)
        record = RunRecord.new(cfg, precision=precision, device=torch.cuda.get_device_name() if cuda else "cpu",
                               variant=run_dir.parent.name)   # the overrides that name this run (e.g. method.lr=0.001)

        def write(rec: RunRecord) -> None:
            if main:
                rec.write(run_dir)

        start, stop = time.perf_counter(), StopOnSignal()
        try:
            data = load_task(cfg.task, cfg.data_dir, cfg.seed)
            record = _train_and_evaluate(cfg, run_dir, data, method, record, start, stop, previous, main)
        except Exception as e:
            if isinstance(e, torch.cuda.OutOfMemoryError):
                e = UserError(f"out of GPU memory: lower train.batch_size (now {cfg.train.batch_size}, raise "
                              f"train.grad_accum to keep the effective batch) or task.max_length "
                              f"(now {cfg.task.max_length})")
            record.status, record.error = "failed", f"{type(e).__name__}: {e}"
            write(record)
            raise e
        except KeyboardInterrupt:
            record.status, record.error = "interrupted", "interrupted before a checkpoint could be saved"
            write(record)
            raise
        finally:
            StopOnSignal.restore_default_handlers()
            if cfg.train.deterministic:   # process-wide: a later run in this process (tests, sweeps) chooses again
                torch.use_deterministic_algorithms(False)
        write(record)
        return record


def _train_and_evaluate(cfg, run_dir: Path, data, method, record: RunRecord, start: float, stop: StopOnSignal,
                        previous: RunRecord | None, main: bool = True) -> RunRecord:
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.backbone)
    datasets, truncated = tokenize(data, tokenizer, cfg.task.max_length, tokenized_cache_dir())
    for split in ("validation", "test"):   # scores do not depend on row order; padding does
        datasets[split] = longest_first(datasets[split])
    if main:
        (run_dir / LABELS_FILE).write_text(json.dumps(data.labels))
    record.data = {"source": data.source, "num_labels": len(data.labels),
                   "sizes": {s: len(d) for s, d in datasets.items()}, "truncated": truncated,
                   "fingerprint": data.fingerprint}

    headline = cfg.task.headline_metric
    args = training_arguments(cfg, run_dir, headline)
    # on the Trainer's device from the start: the sparse probe and the frozen-bottom cache run there, not on the CPU
    model = load_model(cfg.backbone, len(data.labels), tokenizer, cfg.seed).to(args.device)
    context = method_context(cfg, data, datasets, tokenizer, run_dir if main else None)
    t0 = time.perf_counter()
    model = prepare_model(cfg, method, model, context)
    prepare_seconds = time.perf_counter() - t0
    # the frozen bottom's output of every row computed once (or read back) where it applies; the rest is the same
    splits = {k: datasets[k] for k in ("train", "validation", "test")}
    cached, collator, cache = bottom_cache.attach(cfg, model, tokenizer, splits, context.collator,
                                                  bottom_cache.cache_root())
    datasets = {**datasets, **cached}

    positive = data.labels.index(str(cfg.task.positive_label)) if cfg.task.get("positive_label") is not None else None

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return classification_metrics(logits, pred.label_ids, positive)

    loss_func = None
    if cfg.task.get("class_weight"):
        loss_func, weights = class_weighted_loss(datasets["train"]["labels"], len(data.labels))
        record.data["class_weight"] = dict(zip(data.labels, (round(w, 4) for w in weights.tolist())))
    nan_guard = StopOnNonFiniteLoss()
    callbacks = [stop, nan_guard, ReseedEachStep(cfg.seed), EvalClock(start)]
    if cfg.train.get("patience"):   # its counter is saved in checkpoints: a resumed run stops where it would have
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=int(cfg.train.patience)))
    if cfg.train.logger == "csv":
        callbacks.append(CsvLogger(run_dir / LOG_FILE))
    trainer = SparsetuneTrainer(model=model, args=args,
                                data_collator=collator, train_dataset=datasets["train"],
                                eval_dataset=datasets["validation"], processing_class=tokenizer,
                                compute_metrics=compute_metrics, callbacks=callbacks, compute_loss_func=loss_func)
    resume = last_good_checkpoint(run_dir / CHECKPOINTS)
    # time spent before an interruption that left a record (SIGTERM); a SIGKILL leaves none to add
    earlier = (previous.cost or {}) if resume and previous is not None else {}
    start_step = checkpoint_step(resume) if resume else 0

    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0   # includes the per-epoch validation passes
    steps = trainer.state.global_step
    record.cost = {"train_seconds": seconds + earlier.get("train_seconds", 0.0),
                   "seconds_per_step": seconds / max(1, steps - start_step), "steps": steps,
                   "prepare_seconds": prepare_seconds + earlier.get("prepare_seconds", 0.0),
                   "cached_blocks": cache.get("blocks", 0), "cache_built": cache.get("built", False),
                   "cache_seconds": cache.get("seconds", 0.0), **count_params(model), **method.cost_extra()}
    # every validation pass, the best one's scores included (reused below rather than run again)
    logged = {e["step"]: e for e in trainer.state.log_history if f"eval_{headline}" in e}
    record.history = [{"step": step, "epoch": e.get("epoch"), headline: e[f"eval_{headline}"],
                       "seconds": e.get(EvalClock.KEY)} for step, e in logged.items()]
    if nan_guard.reason:
        # final: a resume would replay the same steps into the same divergence, so the checkpoints go
        record.status, record.error = "diverged", nan_guard.reason
        if main:
            shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
        return record
    if stop.signal is not None:
        record.status = "interrupted"
        record.error = f"stopped by {signal.Signals(stop.signal).name}; rerun the same command to resume"
        record.cost.update(peak_memory_mb=peak_memory_mb(),
                           wall_seconds=time.perf_counter() - start + earlier.get("wall_seconds", 0.0))
        return record

    trainer.remove_callback(EarlyStoppingCallback)   # the final test pass is not a validation step
    t0 = time.perf_counter()
    metrics = {}
    # The best checkpoint, loaded at the end, had its validation scores logged when it was chosen
    best = logged.get(trainer.state.best_global_step)
    for split in ("validation", "test"):
        if split == "validation" and best is not None:
            res, prefix = best, "eval_"
        else:
            res, prefix = trainer.evaluate(datasets[split], metric_key_prefix=split), f"{split}_"
        metrics[split] = {k[len(prefix):]: v for k, v in res.items()
                          if k.startswith(prefix) and k[len(prefix):] in ("accuracy", "macro_f1", "f1", "loss")}
    record.metrics = metrics
    record.cost["eval_seconds"] = time.perf_counter() - t0   # the final test pass (and validation if not logged)
    record.cost["world_size"] = trainer.args.world_size   # > 1 under DDP (torchrun)
    loads = [e[EvalClock.LOAD_KEY] for e in logged.values() if EvalClock.LOAD_KEY in e]
    # what else ran: a load average near cpu_count (the machine's, as the load is) means every core was busy
    # (e.g. a parallel sweep's other jobs); usable_cpus is what this process may run on (its affinity)
    # which CPU and which of its instruction sets torch's kernels use: the same run repeats bit for bit only there
    record.cost.update(cpu=f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})",
                       cpu_count=os.cpu_count(), usable_cpus=usable_cpus(), threads=torch.get_num_threads(),
                       load_average=round(float(np.mean(loads)), 2) if loads else None)
    if not main:
        return record
    model_dir = run_dir / MODEL_DIR
    method.save(trainer.model, model_dir)
    record.weights_sha256 = file_sha256(model_dir / WEIGHTS)
    record.cost.update(peak_memory_mb=peak_memory_mb(), checkpoint_mb=dir_mb(model_dir),
                       total_seconds=record.cost["train_seconds"] + record.cost["prepare_seconds"],
                       # everything from the start of the command: loading, tokenizing, mining, probe,
                       # training, evaluation and saving (plus any time before an interruption)
                       wall_seconds=time.perf_counter() - start + earlier.get("wall_seconds", 0.0))
    if not cfg.train.keep_checkpoints:
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    record.status = "completed"
    log.info("%s %s %s seed %s: test %s", cfg.task.name, cfg.backbone.name, cfg.method.name, cfg.seed,
             metrics["test"])
    return record


# ---- pieces of the recipe ----------------------------------------------------------------------------------

class SparsetuneTrainer(Trainer):
    def _get_eval_sampler(self, eval_dataset):
        # Evaluate in the given (longest-first) order. Under train.sampling=group_by_length the Trainer
        # would group evaluation batches too, at random: on 1,000 rows that pads 3x more.
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None


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
        restore_callback_states_from_checkpoint=True,   # early stopping's count survives a resume
        logging_steps=t.logging_steps, logging_first_step=True, report_to=LOGGERS[t.logger],
        # the shuffle of epoch e is seeded with data_seed + e: spread the seeds apart (train.data_order)
        disable_tqdm=not t.progress, seed=cfg.seed, data_seed=cfg.seed * DATA_ORDERS[t.data_order],
        full_determinism=bool(t.deterministic),
        dataloader_num_workers=t.num_workers, label_names=["labels"],
        remove_unused_columns=False,   # the datasets hold only model inputs, plus the frozen-bottom cache's row index
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


def prepare_model(cfg, method, model, context: MethodContext):
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


def method_context(cfg, data, datasets, tokenizer, artifacts: Path | None = None) -> MethodContext:
    """What Method.prepare gets for a new run: the sparse method mines and probes from it."""
    return MethodContext(rows=data.splits["train"], train=datasets["train"],
                         collator=DataCollatorWithPadding(tokenizer),
                         tokenizer=tokenizer, labels=data.labels, max_length=cfg.task.max_length,
                         batch_size=cfg.train.batch_size, seed=cfg.seed, artifacts=artifacts)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def is_main_process() -> bool:
    """Under torchrun or accelerate (DDP) every rank runs this code; only rank 0 writes results."""
    return int(os.environ.get("RANK", "0")) == 0


class _no_lock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
