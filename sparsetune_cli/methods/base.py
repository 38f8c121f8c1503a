"""What every finetuning method is: prepare the model, say what trains, save and reload what it trained.

A method never touches the training loop. `prepare` freezes, wraps or adds parameters; whatever
still has requires_grad=True is what the optimizer sees and what the checkpoint stores. `state` is
any extra structure the method needs to rebuild the same model at load time (e.g. a selection).

A new method is one module in this package plus one YAML in configs/method/: the module defines a
Method subclass decorated with @register, its options as a dataclass (`Options`, typed) and their
ranges (`validate`). Nothing else lists the methods.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ..config import check_types
from ..errors import UserError
from ..models import is_head

WEIGHTS = "trained.safetensors"
STATE = "method_state.json"
METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available as method=NAME (configs/method/NAME.yaml)."""
    METHODS[cls.name] = cls
    return cls


@functools.cache
def _defaults_of(options: type) -> dict:   # built once per Options class: tables and checks ask for every record
    return OmegaConf.to_container(OmegaConf.structured(options))


def get_method(cfg) -> Method:
    """The method a `method` config names, its options checked."""
    if cfg.name not in METHODS:
        raise UserError(f"unknown method {cfg.name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[cfg.name](cfg)


@dataclasses.dataclass
class MethodContext:
    """What `prepare` gets for a new run: the training data as the model sees it and a few run settings."""
    rows: list[dict]          # training rows as formatted text: {"text", "text_pair", "label"}
    train: Any                # the same rows tokenized (a datasets.Dataset with input_ids, labels, ...)
    collator: Any             # pads a list of tokenized rows into a batch
    tokenizer: Any
    labels: list[str]         # index -> label name
    max_length: int
    batch_size: int
    seed: int
    artifacts: Path | None = None   # a folder for the method's own reports; None: write nothing


class Method:
    name = "base"
    changes_base_weights = False   # trained values live in the backbone's own tensors (else in new ones)
    frozen_bottom = False          # everything below some block stays fixed (what trains is the top and the head)
    mergeable = True               # `export` gives a plain model of the base architecture

    @dataclasses.dataclass
    class Options:   # the method's own keys, their types, and the behavior of a run from before a key existed
        pass

    @classmethod
    def option_defaults(cls) -> dict:
        """Each option's Options default: what a run did before the option existed."""
        return copy.deepcopy(_defaults_of(cls.Options))   # a copy: callers may change it

    @classmethod
    def describe(cls, options: dict) -> dict:
        """What tables group a run of this method by besides its lr (e.g. sparse's selector and budget), from its
        recorded options; a record from before an option existed reads as that option's default ({}: nothing)."""
        return {}

    def __init__(self, cfg):
        check_types(cfg, self.Options, "method.")
        # a saved run from before an option existed ran without it: fill the key with that (its Options default)
        missing = {k: v for k, v in self.option_defaults().items() if k not in cfg}
        self.cfg = OmegaConf.merge(OmegaConf.create(missing), cfg) if missing else cfg
        self.validate()
        self.state: dict = {}   # JSON-serializable; saved with the weights

    def validate(self) -> None:
        """Raise UserError naming the key when an option is out of range."""

    def prepare(self, model, context: MethodContext | None = None, state: dict | None = None):
        """Return the model ready to train. `context` (train data etc.) is given for a new run;
        `state` (from a saved run) instead when rebuilding for loading."""
        raise NotImplementedError

    def export(self, model):
        """The model as a plain Hugging Face model of the base architecture (for `sparsetune merge`)."""
        return model

    def cost_extra(self) -> dict:
        """Seconds spent outside the training loop that count toward the run's cost (e.g. a probe)."""
        return {}

    # --- one save/load for all methods: the trainable tensors plus the method's state ---
    def save(self, model, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(out_dir / WEIGHTS))
        (out_dir / STATE).write_text(json.dumps({"method": self.name, "state": self.state}))

    def load(self, model, run_model_dir: Path):
        state = json.loads((run_model_dir / STATE).read_text())["state"]
        model = fp32_trainable(self.prepare(model, state=state))
        tensors = load_file(str(run_model_dir / WEIGHTS))
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if unexpected:
            raise RuntimeError(f"saved tensors do not fit the model: {unexpected[:5]}")
        return model


def fp32_trainable(model):
    """Whatever trains is fp32 (master weights), also over a bf16 backbone (backbone.dtype=bf16): updates of
    1e-4 relative size vanish in bf16's 8-bit mantissa. Frozen weights keep the backbone's dtype."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def freeze_all_but(model, keep) -> None:
    """requires_grad only for parameters whose name satisfies keep(name); the head always trains."""
    for name, p in model.named_parameters():
        p.requires_grad = is_head(name) or keep(name)


def count_params(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and is_head(n))
    return {"trainable_params": trainable, "trainable_params_without_head": trainable - head,
            "total_params": total}
