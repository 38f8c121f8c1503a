"""The run config: where the YAML lives, composing it, its resolvers, its types and its ranges.

Every other module gets a composed, validated config from here. The YAML under configs/ holds the
values; the dataclasses below hold the types, so a value of the wrong type fails with one line that
names the key, whatever the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import typing
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
MAX_TAG = 200   # file systems refuse names over 255 bytes
PATH_KEYS = ("task", "backbone", "method", "seed")   # already spelled in the run folder's path


def run_tag(overrides: str) -> str:
    """A run folder name for the overrides that are not already part of the path. Scalars are spelled as
    Hydra's multirun spells them (`false` -> `False`, `1e-2` -> `0.01`), so `run` and `run -m` of one
    config find the same folder. A name too long for the file system keeps its start and ends in a hash
    of the whole."""
    tag = re.sub(r"(?<==)[^,=\[\]{}()'\"]+(?=,|$)", lambda m: _python_scalar(m.group()),
                 overrides).replace("/", "_") or "default"
    if len(tag.encode()) > MAX_TAG:
        tag = tag.encode()[:MAX_TAG - 17].decode(errors="ignore") + "~" + hashlib.sha256(tag.encode()).hexdigest()[:16]
    return tag


def _python_scalar(text: str) -> str:
    if text.lower() in ("true", "false"):
        return text.capitalize()
    for kind in (int, float):
        try:
            return str(kind(text))
        except ValueError:
            pass
    return text


OmegaConf.register_new_resolver("run_tag", run_tag, replace=True)


def non_result_keys() -> frozenset[str]:
    """Keys that never change a run's results: the one list is hydra's exclude_keys in configs/config.yaml
    (they are left out of run folder names for the same reason), less the keys the path already names."""
    hydra = OmegaConf.load(Path(CONFIG_DIR) / "config.yaml").hydra
    return frozenset(hydra.job.config.override_dirname.exclude_keys) - set(PATH_KEYS)


# Keys added to the shared groups after runs were first recorded, and the value that does what runs did before
# each existed: a record that lacks one ran as that value does. (A method's own keys: its Options defaults.) A
# key added later belongs here too; else records that predate it count as stale (tests/test_sweeps.py checks
# every committed record).
ADDED_KEYS = {
    "backbone.dtype": "fp32",
    "task.attributes": None,
    "task.class_weight": None,
    "train.deterministic": False,
    "train.frozen_dropout": True,   # dropout everywhere, as in Hugging Face training
    "train.patience": None,
    "train.sampling": "random",
    "train.data_order": "epoch_offset",   # seed + epoch seeded each epoch's shuffle
}


def compose(overrides: list[str], hydra: bool = False) -> DictConfig:
    """The run config without starting a run (tokens, paper, tests); hydra=True keeps the hydra node."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    for o in overrides:   # Hydra reads `params.method.budget` as params -> method -> budget, then fails deep inside
        key = o.split("=", 1)[0]
        if key.startswith("hydra.sweeper.params.") and "." in key.removeprefix("hydra.sweeper.params."):
            raise UserError(f"'{o}': a sweep key with a dot cannot be set through hydra.sweeper.params on the "
                            "command line; put the narrowed sweep in an experiment config (configs/experiment/)")
    try:
        with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
            cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=hydra)
    except HydraException as e:   # one line: Hydra's message, the options it lists, the cause's first line
        lines = str(e).splitlines()
        start = next((i + 1 for i, line in enumerate(lines) if line.startswith("Available options")), len(lines))
        options = [line.strip() for line in itertools.takewhile(lambda line: line.startswith("\t"), lines[start:])]
        cause = f": {str(e.__cause__).splitlines()[0]}" if e.__cause__ and str(e.__cause__) else ""
        raise UserError(lines[0] + (f" (available: {', '.join(options)})" if options else "") + cause) from None
    return apply_task_overrides(cfg, overrides)


def apply_task_overrides(cfg: DictConfig, command_line: list[str] = ()) -> DictConfig:
    """An experiment's `task_overrides: {TASK: {key: value}}` merged into cfg.task when TASK is the task chosen
    (a plain `task.max_length` in an experiment would hit every task of its sweep). A key the command line sets
    (`task.max_length=..`) keeps the command line's value. The mapping itself is then dropped: a run records the
    values it used, and an entry for another task does not change this run's config."""
    per_task = cfg.get("task_overrides")
    if per_task is None:
        return cfg
    mine = per_task.get(cfg.task.name)
    unknown = [k for k in (mine or {}) if k not in cfg.task]
    if unknown:
        raise UserError(f"task_overrides.{cfg.task.name}.{unknown[0]}: task {cfg.task.name} has no key "
                        f"'{unknown[0]}' (its keys: {', '.join(cfg.task)})")
    typed = {o.lstrip("+~").split("=", 1)[0] for o in command_line}
    with open_dict(cfg):
        if mine:
            cfg.task = OmegaConf.merge(cfg.task, {k: v for k, v in mine.items() if f"task.{k}" not in typed})
        del cfg["task_overrides"]
    return cfg


# ---- types ------------------------------------------------------------------------------------------------
# Only the keys code reads as numbers or flags are typed here; strings with a fixed set of values are checked
# with their ranges below. A method's own options are typed by the method (Method.Options).

@dataclasses.dataclass
class TrainSchema:
    epochs: float = MISSING
    max_steps: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    grad_accum: int = MISSING
    weight_decay: float = MISSING
    warmup: float = MISSING
    max_grad_norm: float = MISSING
    frozen_dropout: bool = MISSING
    deterministic: bool = False
    cache_bottom: bool = True
    eval_every: Any = MISSING          # 'epoch' or an int: checked with the ranges
    patience: Optional[int] = None
    logging_steps: int = MISSING
    progress: bool = MISSING
    keep_checkpoints: bool = MISSING
    num_workers: int = MISSING
    threads: Optional[int] = None


@dataclasses.dataclass
class TaskSchema:
    max_length: int = MISSING
    train_limit: Optional[int] = None
    eval_limit: Optional[int] = None
    validation_fraction: float = 0.1
    split_seed: int = 0
    attributes: Optional[list[str]] = None


@dataclasses.dataclass
class BackboneSchema:
    max_positions: int = MISSING
    trust_remote_code: bool = False


@dataclasses.dataclass
class MethodSchema:
    lr: float = MISSING
    lr_grid: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RunSchema:
    seed: int = MISSING
    force: bool = False


TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}


def check_types(node, schema, prefix: str = "") -> None:
    """Raise one line naming the first key of `node` whose value does not fit its type in `schema` (a dataclass);
    keys the schema does not name are left alone."""
    fields = typing.get_type_hints(schema)
    values = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k in fields} \
        if isinstance(node, DictConfig) else {k: v for k, v in node.items() if k in fields}
    try:
        OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or getattr(e, "key", "") or "?")
        kind = fields.get(key)
        kind = getattr(kind, "__args__", (kind,))[0]   # Optional[X] -> X
        expected = TYPE_NAMES.get(typing.get_origin(kind) or kind, str(kind))
        raise UserError(f"{prefix}{key}={values.get(key)!r} is not valid: expected {expected}") from None


# ---- ranges -----------------------------------------------------------------------------------------------
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("fp32", "bf16")
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch")   # the same AdamW; fused is one kernel per step
SAMPLING = ("random", "group_by_length")        # the Trainer's train_sampling_strategy
DATA_ORDERS = {"independent": 1_000_003, "epoch_offset": 1}   # the data seed is seed x this (+ epoch, per epoch)
LOGGERS = {"csv": "none", "none": "none", "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def resolve_precision(t) -> tuple[bool, str]:
    """(use CUDA, precision): train.precision=auto is bf16 on a CUDA GPU that has it, fp16 on an older one,
    fp32 on the CPU."""
    import torch
    cuda = torch.cuda.is_available() and t.device != "cpu"
    if t.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if t.precision != "auto":
        return cuda, t.precision
    return cuda, ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"


def validate_config(cfg) -> None:
    """Fail before any model is loaded, naming the key and what is allowed. A method's own options are the
    method's to check (get_method)."""
    check_types(cfg, RunSchema)
    check_types(cfg.train, TrainSchema, "train.")
    check_types(cfg.task, TaskSchema, "task.")
    check_types(cfg.backbone, BackboneSchema, "backbone.")
    check_types(cfg.method, MethodSchema, "method.")
    t, task, bb = cfg.train, cfg.task, cfg.backbone
    checks = [
        (t.epochs > 0 or t.max_steps > 0, "train.epochs", t.epochs, "> 0 (or set train.max_steps > 0)"),
        (t.max_steps == -1 or t.max_steps > 0, "train.max_steps", t.max_steps, "-1 (off) or > 0"),
        (t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1"),
        (t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size, ">= 1"),
        (t.grad_accum >= 1, "train.grad_accum", t.grad_accum, ">= 1"),
        (t.sampling in SAMPLING, "train.sampling", t.sampling, " or ".join(SAMPLING)),
        (t.data_order in DATA_ORDERS, "train.data_order", t.data_order, " or ".join(DATA_ORDERS)),
        (cfg.method.lr > 0, "method.lr", cfg.method.lr, "> 0"),
        (t.weight_decay >= 0, "train.weight_decay", t.weight_decay, ">= 0"),
        (0 <= t.warmup < 1 or (t.warmup >= 1 and float(t.warmup).is_integer()), "train.warmup", t.warmup,
         "a fraction in [0, 1) or a whole number of steps"),
        (t.precision in PRECISIONS, "train.precision", t.precision, ", ".join(PRECISIONS)),
        (t.device in DEVICES, "train.device", t.device, ", ".join(DEVICES)),
        ((bb.get("dtype") or "fp32") in DTYPES, "backbone.dtype", bb.get("dtype"), ", ".join(DTYPES)),
        (t.logger in LOGGERS, "train.logger", t.logger, ", ".join(LOGGERS)),
        (t.optimizer in OPTIMIZERS, "train.optimizer", t.optimizer, ", ".join(OPTIMIZERS)),
        (t.eval_every == "epoch" or (isinstance(t.eval_every, int) and not isinstance(t.eval_every, bool)
                                     and t.eval_every > 0), "train.eval_every", t.eval_every,
         "'epoch' or a number of steps > 0"),
        (t.threads is None or t.threads >= 1, "train.threads", t.threads, "null or >= 1"),
        (t.get("patience") is None or t.patience >= 1, "train.patience", t.get("patience"), "null (off) or >= 1"),
        (8 <= task.max_length <= bb.max_positions, "task.max_length", task.max_length,
         f"8..{bb.max_positions} for backbone {bb.name}"),
        (task.get("train_limit") is None or task.train_limit >= 2, "task.train_limit", task.get("train_limit"),
         "null or >= 2"),
        (task.get("eval_limit") is None or task.eval_limit >= 1, "task.eval_limit", task.get("eval_limit"),
         "null or >= 1"),
        (task.get("class_weight") in (None, "balanced"), "task.class_weight", task.get("class_weight"),
         "null or balanced"),
    ]
    for ok, key, value, allowed in checks:
        if not ok:
            raise UserError(f"{key}={value} is out of range: allowed {allowed}")


def validate_precision(cfg) -> None:
    """The precision and dtype settings against this machine (imports torch, so a sweep skipping finished runs
    checks them only when a run starts)."""
    t, bb = cfg.train, cfg.backbone
    cuda, precision = resolve_precision(t)
    if precision == "fp16" and not cuda:
        raise UserError("train.precision=fp16 needs a CUDA GPU (on the CPU it would silently run in fp32, with no "
                        "loss scaling); use train.precision=bf16 or fp32")
    if bb.get("dtype") == "bf16" and precision != "bf16":
        raise UserError(f"backbone.dtype=bf16 needs train.precision=bf16 (it resolves to {precision} here): a bf16 "
                        "backbone runs under bf16 autocast; or set backbone.dtype=fp32")


def method_defaults(name: str) -> DictConfig:
    """A method's YAML as shipped (e.g. sparse's mining settings for `sparsetune tokens` with another method)."""
    return OmegaConf.load(Path(CONFIG_DIR) / "method" / f"{name}.yaml")
