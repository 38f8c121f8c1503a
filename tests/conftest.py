"""Shared helpers: configs composed like the CLI does, tiny models, small slices of the real data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never touch the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = ["task.train_limit=200", "task.eval_limit=60", "train.epochs=1", "train.progress=false",
        "train.logging_steps=5"]


def compose(overrides: list[str]):
    from sparsetune_cli.config import compose as _compose
    return _compose(overrides)


def run_tiny(tmp_path: Path, overrides: list[str]):
    """One real training run in-process on a tiny model; returns (record, run_dir)."""
    from sparsetune_cli.train import run
    cfg = compose(["backbone=tiny-encoder", f"output_root={tmp_path}"] + TINY + overrides)
    run_dir = tmp_path / "run"
    return run(cfg, run_dir).to_dict(), run_dir


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data bundle not found at {DATA_DIR}")
    return DATA_DIR
