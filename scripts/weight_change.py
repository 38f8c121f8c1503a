"""Where did finetuning change the backbone? For each completed run, the relative change of its weight matrices
from the pretrained ones, ||W - W0|| / ||W0|| over the 2-D weights of the input embeddings and of each transformer
block (bottom to top). The run's trained state is merged into the plain architecture first (the method's export:
LoRA's products, sparse's row deltas), so the numbers compare across methods. Needs the runs' weights, which are
not committed: run it where the runs trained.
  python scripts/weight_change.py RUN_DIR [RUN_DIR ...]        (a markdown table on stdout)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from sparsetune_cli.models import load_model, transformer_blocks
from sparsetune_cli.predict import load_run


def relative_change(trained: torch.nn.Module, base: torch.nn.Module) -> float:
    base_weights = dict(base.named_parameters())
    change = norm = 0.0
    for name, w in trained.named_parameters():
        if w.dim() == 2:
            w0 = base_weights[name].detach().float()
            change += (w.detach().float() - w0).pow(2).sum().item()
            norm += w0.pow(2).sum().item()
    return (change / norm) ** 0.5


def block_changes(run_dir: Path) -> dict:
    run = load_run(run_dir)
    trained = run.method.export(run.model).float()
    base = load_model(run.cfg.backbone, len(run.labels), run.tokenizer, run.cfg.seed).float()
    row = {"run": str(run_dir), "embeddings": relative_change(trained.get_input_embeddings(),
                                                             base.get_input_embeddings())}
    for i, ((_, block), (_, block0)) in enumerate(zip(transformer_blocks(trained), transformer_blocks(base))):
        row[f"block {i}"] = relative_change(block, block0)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="completed run folders (with their model/ weights)")
    args = parser.parse_args()
    table = pd.DataFrame([block_changes(r) for r in args.runs])
    print(table.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
