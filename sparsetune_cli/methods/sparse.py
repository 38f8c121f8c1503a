"""Token-driven sparse finetuning (see ../shared/design/token-sparse.md and README "The sparse method").

1. Token groups: label-associated words/phrases of the training set (tokens.py).
2. Probe: forward/backward on a few training batches, no update. For each linear layer of the
   transformer blocks, the gradient of output row j is sum_t delta_t[j] x_t; keeping only positions t
   inside token groups gives the token-driven gradient. Row score = its squared norm, summed over
   batches, divided by the matrix mean so layers of different scale compete fairly.
3. Selection: top rows within a parameter budget, restricted to the top `depth` blocks so that the
   blocks below need no backward pass at all.
4. Training: W stays frozen; each selected row gets a trainable delta, y[..., rows] += x D^T.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..formats import encode
from ..models import is_head, transformer_blocks
from ..tokens import mine, position_mask
from ..tokens import report as make_report
from .base import Method, MethodContext, register

log = logging.getLogger(__name__)
SELECTORS = ("token", "all_positions", "magnitude", "random")


def master_dtype(weight: torch.Tensor) -> torch.dtype:
    """A delta is at least fp32 even over a bf16 backbone (backbone.dtype=bf16): it is a master weight."""
    return torch.promote_types(weight.dtype, torch.float32)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a plain nn.Linear would compute in here: autocast's (bf16/fp16) when it is on, else the
    weight's. A custom Function is not cast by autocast itself, and its backward runs outside autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class _RowDeltaLinearFn(torch.autograd.Function):
    """y = x (W + D on the selected rows)^T + b. Forward is one matmul with the patched weight, as in a
    plain linear layer (patching W copies out x in values, far fewer than adding into y's batch x tokens x
    out); backward computes the input gradient and only the k selected rows' weight gradient.

    Mixed precision: both matmuls run in the compute dtype (bf16/fp16 under autocast), as nn.Linear's do;
    the delta (an fp32 master weight) gets its gradient cast back to fp32, and x its gradient in x's dtype.
    The rows are unique, so index_add has no colliding writes: the result is deterministic on CUDA too."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, delta):
        dtype = _compute_dtype(x, weight)
        patched = weight.index_add(0, rows, delta.to(weight.dtype)).to(dtype)
        xc = x.to(dtype)
        ctx.save_for_backward(xc, patched, rows)
        ctx.dtypes = (x.dtype, delta.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(xc, patched, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_y):
        x, patched, rows = ctx.saved_tensors
        x_dtype, delta_dtype = ctx.dtypes
        grad_y = grad_y.to(patched.dtype)
        grad_x = (grad_y @ patched).to(x_dtype) if ctx.needs_input_grad[0] else None
        grad_delta = grad_y.index_select(-1, rows).reshape(-1, len(rows)).T @ x.reshape(-1, x.shape[-1])
        return grad_x, None, None, None, grad_delta.to(delta_dtype)


class RowDeltaLinear(nn.Linear):
    """nn.Linear with a frozen weight and a trainable delta on some output rows. Keeps the
    `weight`/`bias` names of the module it replaces, so the base weights load and merge as usual."""

    def __init__(self, base: nn.Linear, rows: torch.Tensor):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.register_buffer("rows", rows.to(torch.long), persistent=False)
        self.delta = nn.Parameter(torch.zeros(len(rows), base.in_features, dtype=master_dtype(base.weight),
                                              device=base.weight.device))

    def forward(self, x):
        return _RowDeltaLinearFn.apply(x, self.weight, self.bias, self.rows, self.delta)

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            out.weight.index_add_(0, self.rows, self.delta.to(out.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out


class RowDeltaEmbedding(nn.Embedding):
    """nn.Embedding with a frozen table and trainable deltas for some token ids."""

    def __init__(self, base: nn.Embedding, rows: torch.Tensor):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm = base.padding_idx, None
        self.norm_type, self.scale_grad_by_freq, self.sparse = base.norm_type, base.scale_grad_by_freq, False
        self.weight = base.weight
        self.weight.requires_grad_(False)
        slot = torch.full((base.num_embeddings,), -1, dtype=torch.long)
        slot[rows.to(torch.long)] = torch.arange(len(rows))
        self.register_buffer("rows", rows.to(torch.long), persistent=False)
        self.register_buffer("slot", slot, persistent=False)
        self.delta = nn.Parameter(torch.zeros(len(rows), base.embedding_dim, dtype=master_dtype(base.weight),
                                              device=base.weight.device))

    def forward(self, ids):
        slot = self.slot[ids]
        extra = self.delta[slot.clamp(min=0)] * (slot >= 0).unsqueeze(-1).to(self.delta.dtype)
        return F.embedding(ids, self.weight, self.padding_idx) + extra.to(self.weight.dtype)

    def merged(self) -> nn.Embedding:
        out = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            out.weight.index_add_(0, self.rows, self.delta.to(out.weight.dtype))
        return out


def block_linears(model) -> list[tuple[int, str, nn.Linear]]:
    """(block index, module name, module) for every linear layer inside the transformer blocks."""
    out = []
    for b, (prefix, block) in enumerate(transformer_blocks(model)):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                out.append((b, f"{prefix}.{name}", module))
    return out


def _replace(model, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@register
class Sparse(Method):
    name = "sparse"
    frozen_bottom = True   # below the top `depth` blocks (unless embeddings=true)

    @dataclasses.dataclass
    class Options:
        budget: float = 0.01
        depth: Any = 2            # a number of blocks, or all
        selector: str = "token"
        num_groups: int = 1000
        min_count: int = 3
        max_ngram: int = 3
        probe_batches: int = 16
        frozen_dropout: bool = False
        embeddings: bool = False

    def validate(self) -> None:
        cfg = self.cfg
        if cfg.selector not in SELECTORS:
            raise UserError(f"method.selector={cfg.selector!r}: choose one of {', '.join(SELECTORS)}")
        if not 0 < cfg.budget <= 1:
            raise UserError(f"method.budget={cfg.budget} is out of range: allowed (0, 1]")
        if not (cfg.depth in (None, "all") or (isinstance(cfg.depth, int) and cfg.depth >= 1)):
            raise UserError(f"method.depth={cfg.depth!r}: a number of top blocks >= 1, or all")
        for key in ("num_groups", "min_count", "max_ngram", "probe_batches"):
            if cfg[key] < 1:
                raise UserError(f"method.{key}={cfg[key]} is out of range: allowed >= 1")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.timings: dict[str, float] = {}

    def cost_extra(self) -> dict:
        return dict(self.timings)

    # ---------------------------------------------------------------- prepare
    def prepare(self, model, context=None, state=None):
        if state is None:
            state = self.select(model, context)
        self.state = state
        for p in model.parameters():
            p.requires_grad = False
        for name, p in model.named_parameters():
            if is_head(name):
                p.requires_grad = True
        for name, rows in state["rows"].items():
            module = model.get_submodule(name)
            cls = RowDeltaEmbedding if isinstance(module, nn.Embedding) else RowDeltaLinear
            _replace(model, name, cls(module, torch.tensor(rows)))
        return model

    def export(self, model):
        for name, module in list(model.named_modules()):
            if isinstance(module, (RowDeltaLinear, RowDeltaEmbedding)):
                _replace(model, name, module.merged())
        return model

    # ---------------------------------------------------------------- stages 1-3
    def select(self, model, context: MethodContext) -> dict:
        cfg = self.cfg
        rng = np.random.default_rng(context.seed)
        linears = block_linears(model)
        n_blocks = len(transformer_blocks(model))
        backbone_params = sum(p.numel() for n, p in model.named_parameters() if not is_head(n))
        budget = int(cfg.budget * backbone_params)
        depth = n_blocks if cfg.depth in (None, "all") else int(cfg.depth)
        if not 1 <= depth <= n_blocks:
            raise UserError(f"method.depth={cfg.depth}: must be 1..{n_blocks} (or all) for this backbone")

        groups, report = None, None
        t0 = time.perf_counter()
        if cfg.selector == "token" or cfg.embeddings:
            groups = mine(context.rows, context.labels, context.tokenizer, context.max_length,
                          cfg.num_groups, cfg.min_count, cfg.max_ngram)
            report = make_report(groups, context.labels, context.tokenizer)
            if context.artifacts is not None:
                (context.artifacts / "token_groups.md").write_text(report["markdown"])
                (context.artifacts / "token_groups.json").write_text(json.dumps(
                    {"groups": report["groups"], "per_class": report["per_class"]}, indent=1))
        self.timings["mining_seconds"] = time.perf_counter() - t0
        if groups is not None and not groups.groups:
            log.warning("no token group reaches min_count=%d: the probe uses all positions", cfg.min_count)
            groups = None

        t0 = time.perf_counter()
        if cfg.selector in ("token", "all_positions"):
            scores, emb_scores = self.probe(model, context, groups, linears, rng,
                                            lowest=0 if cfg.embeddings else n_blocks - depth)
        elif cfg.selector == "magnitude":
            scores = {name: m.weight.detach().abs().sum(1).double() / m.weight.detach().abs().sum(1).double().mean()
                      for _, name, m in linears}
            emb_scores = None
        else:  # random
            scores = {name: torch.from_numpy(rng.random(m.out_features)) for _, name, m in linears}
            emb_scores = None
        self.timings["probe_seconds"] = time.perf_counter() - t0

        # Candidates: (score, module name, row, cost in parameters), only in the top `depth` blocks.
        allowed = {name for b, name, _ in linears if b >= n_blocks - depth}
        cand_scores, cand_names, cand_rows, cand_cost = [], [], [], []
        for _, name, m in linears:
            if name in allowed:
                s = scores[name].numpy()
                cand_scores.append(s)
                cand_names += [name] * len(s)
                cand_rows.append(np.arange(len(s)))
                cand_cost.append(np.full(len(s), m.in_features))
        if cfg.embeddings and emb_scores is not None:
            emb_name, emb_ids, emb_s = emb_scores
            cand_scores.append(emb_s)
            cand_names += [emb_name] * len(emb_s)
            cand_rows.append(emb_ids)
            cand_cost.append(np.full(len(emb_s), model.get_submodule(emb_name).embedding_dim))
        s, r, c = np.concatenate(cand_scores), np.concatenate(cand_rows), np.concatenate(cand_cost)
        order = np.argsort(-s, kind="stable")
        within = np.cumsum(c[order]) <= budget
        chosen = order[within]
        rows: dict[str, list[int]] = {}
        for i in chosen:
            rows.setdefault(cand_names[i], []).append(int(r[i]))
        rows = {k: sorted(v) for k, v in sorted(rows.items())}
        used = int(c[chosen].sum())
        if not rows:
            raise UserError(f"method.budget={cfg.budget} is below one row ({int(c.min())} parameters) for this backbone")
        log.info("sparse: %d rows in %d matrices, %d parameters (%.2f%% of %d), mining %.1fs, probe %.1fs",
                 len(chosen), len(rows), used, 100 * used / backbone_params, backbone_params,
                 self.timings["mining_seconds"], self.timings["probe_seconds"])
        return {"selector": cfg.selector, "budget": cfg.budget, "depth": depth, "selected_params": used,
                "backbone_params": backbone_params, "rows": rows,
                "per_block_params": _per_block(rows, linears, model)}

    def probe(self, model, context, groups, linears, rng, lowest: int = 0):
        """Accumulate token-driven (or all-position) squared gradient norms per output row, for the blocks
        from `lowest` up: the backward pass starts at that block's input and costs nothing below it."""
        cfg = self.cfg
        train, collator, tokenizer = context.train, context.collator, context.tokenizer
        bs = context.batch_size
        n = min(len(train), cfg.probe_batches * bs)
        idx = rng.choice(len(train), size=n, replace=False)
        enc = encode(tokenizer, [context.rows[i] for i in idx], context.max_length) if groups else None

        scores = {name: torch.zeros(m.out_features, dtype=torch.float64) for _, name, m in linears}
        emb = model.get_input_embeddings()
        emb_name = next(n for n, m in model.named_modules() if m is emb)
        vocab_grad = {}
        current = {}
        handles = []

        def keep_input(name):
            def hook(module, inputs, output):
                x = inputs[0].detach()
                mask = current["mask"]

                def on_grad(g):
                    gm = g.detach().float() * mask.unsqueeze(-1)   # scores in fp32 over a bf16 backbone too
                    grad = torch.einsum("...o,...i->oi", gm, x.float())
                    scores[name] += grad.double().pow(2).sum(1)
                output.register_hook(on_grad)
            return hook

        def grad_entry(module, inputs, output):
            out = output.detach().requires_grad_(True)
            ids, mask = inputs[0], current["mask"]

            def on_grad(g):
                if not current["group_ids"]:
                    return
                g = (g.detach().float() * mask.unsqueeze(-1)).reshape(-1, g.shape[-1])
                flat = ids.reshape(-1)
                acc = torch.zeros(module.num_embeddings, g.shape[-1]).index_add_(0, flat, g)
                for t in current["group_ids"]:
                    vocab_grad[t] = vocab_grad.get(t, 0) + acc[t].double().pow(2).sum().item()
            out.register_hook(on_grad)
            return out

        def block_entry(module, args):
            return (args[0].detach().requires_grad_(True),) + tuple(args[1:])

        for b, name, m in linears:
            if b >= lowest:
                handles.append(m.register_forward_hook(keep_input(name)))
        if lowest == 0:
            handles.append(emb.register_forward_hook(grad_entry))
        else:
            handles.append(transformer_blocks(model)[lowest][1].register_forward_pre_hook(block_entry))
        group_ids = sorted({t for g in groups.groups for t in g}) if groups else []
        current["group_ids"] = group_ids if cfg.embeddings else []
        was_training, flags = model.training, {n: p.requires_grad for n, p in model.named_parameters()}
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            for start in range(0, n, bs):
                batch_idx = list(range(start, min(n, start + bs)))
                batch = collator([train[int(idx[i])] for i in batch_idx])
                length = batch["input_ids"].shape[1]
                if groups is not None and cfg.selector == "token":
                    masks = [position_mask(groups, enc, i, len(enc["input_ids"][i])) for i in batch_idx]
                    mask = torch.zeros(len(batch_idx), length)
                    for row, m in enumerate(masks):
                        if tokenizer.padding_side == "left":
                            mask[row, length - len(m):] = torch.from_numpy(m)
                        else:
                            mask[row, :len(m)] = torch.from_numpy(m)
                else:
                    mask = batch["attention_mask"].float()
                current["mask"] = mask
                model(**batch).loss.backward()
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
            for nm, p in model.named_parameters():
                p.requires_grad_(flags[nm])
        normalized = {k: v / v.mean().clamp(min=1e-30) for k, v in scores.items()}
        emb_scores = None
        if cfg.embeddings and vocab_grad:
            ids = np.array(sorted(vocab_grad))
            vals = np.array([vocab_grad[t] for t in ids])
            emb_scores = (emb_name, ids, vals / max(vals.mean(), 1e-30))
        return normalized, emb_scores


def _per_block(rows: dict, linears, model) -> dict:
    block_of = {name: b for b, name, _ in linears}
    per = {}
    for name, r in rows.items():
        m = model.get_submodule(name)
        width = m.in_features if isinstance(m, nn.Linear) else m.embedding_dim
        key = f"block{block_of[name]}" if name in block_of else "embeddings"
        per[key] = per.get(key, 0) + len(r) * width
    return per
