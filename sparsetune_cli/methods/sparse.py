"""Token-driven sparse finetuning (see ../shared/design/token-sparse.md and README "The sparse method").

1. Token groups: label-associated words/phrases of the training set (tokens.py).
2. Probe: forward/backward on a few training batches, no update. For each linear layer of the
   transformer blocks, the gradient of output row j is sum_t delta_t[j] x_t; keeping only positions t
   inside token groups gives the token-driven gradient. Row score = its squared norm, summed over
   batches, divided by the matrix mean so layers of different scale compete fairly.
3. Selection: top rows within a parameter budget, restricted to the top `depth` blocks so that the
   blocks below need no backward pass at all.
4. Training: W stays frozen; each selected row gets a trainable delta, y[..., rows] += x D^T.

Variants for the selector study (README "Which rows"): other token-driven scores (per-example Fisher,
label-evidence positions, gradient x weight), columns (input features) instead of rows, a depth the
probe chooses (depth=auto), a probe through a head fitted first (probe_head_steps) or that also scores the
position the head reads (probe_readout), the same share of every matrix (allocation=even), and each matrix the
share the token probe gives it (allocation=probe: random or magnitude rows there are the control for which rows,
apart from which matrices).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import bottom_cache
from ..errors import UserError
from ..formats import encode
from ..models import is_head, transformer_blocks
from ..tokens import mine, position_mask
from ..tokens import report as make_report
from .base import Method, MethodContext, register

log = logging.getLogger(__name__)
# How rows (or columns) are scored. Token-driven: the gradient at token-group positions, as
#   token              the squared norm of each probe batch's gradient, summed (the default)
#   token_fisher       per example, summed: the diagonal Fisher restricted to group positions, aggregated to rows
#   token_contrastive  only at positions of groups that point to the example's own label, weighted by the
#                      group's association z-score (evidence for the right class, not any group)
#   token_x_weight     (gradient x weight) summed over the row, squared per batch: the first-order change of the
#                      loss if the row were scaled, the Taylor importance of pruning work
# Controls: all_positions (the token score over every position), magnitude (|W|), random.
SELECTORS = ("token", "token_fisher", "token_contrastive", "token_x_weight", "all_positions", "magnitude", "random")
PROBED = {"token", "token_fisher", "token_contrastive", "token_x_weight", "all_positions"}
GRANULARITIES = ("rows", "columns")
# How the budget is shared among matrices: by_score, one ranking of every row of every matrix (the default), or
# even, every matrix the same share of its rows, its best-scoring ones (the selector then only says which rows), or
# probe, every matrix as many as the token probe gives it (by_score over the token score), the selector's best ones.
ALLOCATIONS = ("by_score", "even", "probe")
AUTO_DEPTH_SHARE = 0.75   # depth=auto: the fewest top blocks that hold this share of an all-block selection


def master_dtype(weight: torch.Tensor) -> torch.dtype:
    """A delta is at least fp32 even over a bf16 backbone (backbone.dtype=bf16): it is a master weight."""
    return torch.promote_types(weight.dtype, torch.float32)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a plain nn.Linear would compute in here: autocast's (bf16/fp16) when it is on, else the
    weight's. A custom Function is not cast by autocast itself, and its backward runs outside autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class _DeltaLinearFn(torch.autograd.Function):
    """y = x (W + D on the selected rows, or columns)^T + b. Forward is one matmul with the patched weight, as in
    a plain linear layer (patching W copies out x in values, far fewer than adding into y's batch x tokens x
    out); backward computes the input gradient and only the selected rows' (columns') weight gradient.

    Mixed precision: both matmuls run in the compute dtype (bf16/fp16 under autocast), as nn.Linear's do;
    the delta (an fp32 master weight) gets its gradient cast back to fp32, and x its gradient in x's dtype.
    The indices are unique, so index_add has no colliding writes: the result is deterministic on CUDA too."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, delta, dim):
        dtype = _compute_dtype(x, weight)
        patched = weight.index_add(dim, index, delta.to(weight.dtype)).to(dtype)
        xc = x.to(dtype)
        ctx.save_for_backward(xc, patched, index)
        ctx.dtypes, ctx.dim = (x.dtype, delta.dtype), dim
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(xc, patched, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_y):
        x, patched, index = ctx.saved_tensors
        x_dtype, delta_dtype = ctx.dtypes
        grad_y = grad_y.to(patched.dtype)
        grad_x = (grad_y @ patched).to(x_dtype) if ctx.needs_input_grad[0] else None
        if ctx.dim == 0:   # rows: (k, in)
            grad_delta = grad_y.index_select(-1, index).reshape(-1, len(index)).T @ x.reshape(-1, x.shape[-1])
        else:              # columns: (out, k)
            grad_delta = grad_y.reshape(-1, grad_y.shape[-1]).T @ x.index_select(-1, index).reshape(-1, len(index))
        return grad_x, None, None, None, grad_delta.to(delta_dtype), None


class DeltaLinear(nn.Linear):
    """nn.Linear with a frozen weight and a trainable delta on some output rows (dim=0) or input columns (dim=1).
    Keeps the `weight`/`bias` names of the module it replaces, so the base weights load and merge as usual."""

    def __init__(self, base: nn.Linear, index: torch.Tensor, dim: int = 0):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.dim = base.in_features, base.out_features, dim
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.register_buffer("rows", index.to(base.weight.device, torch.long), persistent=False)   # or columns
        shape = (len(index), base.in_features) if dim == 0 else (base.out_features, len(index))
        self.delta = nn.Parameter(torch.zeros(shape, dtype=master_dtype(base.weight), device=base.weight.device))

    def forward(self, x):
        return _DeltaLinearFn.apply(x, self.weight, self.bias, self.rows, self.delta, self.dim)

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            out.weight.index_add_(self.dim, self.rows, self.delta.to(out.weight.dtype))
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
        rows = rows.to(base.weight.device, torch.long)
        slot = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=rows.device)
        slot[rows] = torch.arange(len(rows), device=rows.device)
        self.register_buffer("rows", rows, persistent=False)
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


def readout_positions(model, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per example, the position the classification head reads: the last non-pad token for decoder classifiers
    (a `score` head, as Hugging Face's causal-LM classifiers), else the first ([CLS]). In the top block only
    this position's outputs reach the loss, so a probe that skips it cannot score that block's feed-forward."""
    if hasattr(model, "score"):   # either padding side
        return attention_mask.shape[1] - 1 - attention_mask.flip(1).int().argmax(1)
    return torch.zeros(len(attention_mask), dtype=torch.long, device=attention_mask.device)


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
        depth: Any = 2            # a number of blocks, all, or auto (the probe chooses)
        selector: str = "token"
        granularity: str = "rows"
        num_groups: int = 1000
        min_count: int = 3
        max_ngram: int = 3
        probe_batches: int = 16
        probe_head_steps: int = 0
        probe_readout: bool = False
        allocation: str = "by_score"
        frozen_dropout: bool = False
        embeddings: bool = False

    @classmethod
    def describe(cls, options: dict) -> dict:
        """The selector, labelled with what changes the rows it picks: the probe's variants for a probed selector
        (+head64: through a fitted head; +readout; +emb: group tokens' embedding rows compete for the budget), the
        allocation for any (+even, +probe); random and magnitude ignore the probe's unless the probe allocates."""
        o = {**cls.option_defaults(), **options}
        selector = o["selector"]
        if selector in PROBED or o["allocation"] == "probe":
            selector += (f"+head{o['probe_head_steps']}" if o["probe_head_steps"] else "") + \
                ("+readout" if o["probe_readout"] else "") + ("+emb" if o["embeddings"] else "")
        if o["allocation"] != "by_score":
            selector += f"+{o['allocation']}"
        return {"selector": selector, "budget": o["budget"], "depth": str(o["depth"]), "granularity": o["granularity"]}

    def validate(self) -> None:
        cfg = self.cfg
        if cfg.selector not in SELECTORS:
            raise UserError(f"method.selector={cfg.selector!r}: choose one of {', '.join(SELECTORS)}")
        if cfg.granularity not in GRANULARITIES:
            raise UserError(f"method.granularity={cfg.granularity!r}: choose rows or columns")
        if not 0 < cfg.budget <= 1:
            raise UserError(f"method.budget={cfg.budget} is out of range: allowed (0, 1]")
        if not (cfg.depth in (None, "all", "auto") or (isinstance(cfg.depth, int) and cfg.depth >= 1)):
            raise UserError(f"method.depth={cfg.depth!r}: a number of top blocks >= 1, all, or auto")
        if cfg.depth == "auto" and cfg.selector not in PROBED:
            raise UserError(f"method.depth=auto needs a probed selector ({', '.join(sorted(PROBED))}), not "
                            f"{cfg.selector}: it puts the rows where the probe's scores concentrate")
        for key in ("num_groups", "min_count", "max_ngram", "probe_batches"):
            if cfg[key] < 1:
                raise UserError(f"method.{key}={cfg[key]} is out of range: allowed >= 1")
        if cfg.allocation not in ALLOCATIONS:
            raise UserError(f"method.allocation={cfg.allocation!r}: choose by_score, even or probe")
        if cfg.allocation == "probe" and cfg.depth == "auto":
            raise UserError("method.allocation=probe fills the token probe's matrices at a given depth: set "
                            "method.depth to a number of blocks or all, not auto")
        if cfg.allocation != "by_score" and cfg.embeddings:
            raise UserError(f"method.allocation={cfg.allocation} shares the budget among linear layers: it cannot be "
                            "used with method.embeddings=true")
        if cfg.probe_head_steps < 0:
            raise UserError(f"method.probe_head_steps={cfg.probe_head_steps} is out of range: allowed >= 0")

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
        for key, dim in (("rows", 0), ("columns", 1)):
            for name, index in state.get(key, {}).items():
                module = model.get_submodule(name)
                new = RowDeltaEmbedding(module, torch.tensor(index)) if isinstance(module, nn.Embedding) \
                    else DeltaLinear(module, torch.tensor(index), dim)
                _replace(model, name, new)
        return model

    def export(self, model):
        for name, module in list(model.named_modules()):
            if isinstance(module, (DeltaLinear, RowDeltaEmbedding)):
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
        columns = cfg.granularity == "columns"
        depth = n_blocks if cfg.depth in (None, "all", "auto") else int(cfg.depth)
        if not 1 <= depth <= n_blocks:
            raise UserError(f"method.depth={cfg.depth}: must be 1..{n_blocks} (or all) for this backbone")

        groups = None
        t0 = time.perf_counter()
        if cfg.selector.startswith("token") or cfg.embeddings or cfg.allocation == "probe":
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
        emb_scores = counts = None
        if cfg.allocation == "probe":   # how many units each matrix gets: what the token probe gives it (a probed
            # selector then probes again, on the next batches, for which units)
            rows_s, cols_s, _ = self.probe(model, context, groups, linears, rng, n_blocks - depth, kind="token")
            counts = {name: len(idx) for name, idx in
                      _choose(cols_s if columns else rows_s, linears, budget, columns, depth).items()}
        if cfg.selector in PROBED:
            rows_s, cols_s, emb_scores = self.probe(model, context, groups, linears, rng,
                                                    lowest=0 if cfg.embeddings else n_blocks - depth)
            scores = cols_s if columns else rows_s
        elif cfg.selector == "magnitude":
            scores = {name: _normalized(m.weight.detach().abs().sum(0 if columns else 1).double()).cpu()
                      for _, name, m in linears}
        else:  # random
            scores = {name: torch.from_numpy(rng.random(m.in_features if columns else m.out_features))
                      for _, name, m in linears}
        self.timings["probe_seconds"] = time.perf_counter() - t0

        extra = {}
        if cfg.depth == "auto":   # the fewest top blocks that hold most of an all-block selection
            chosen = _choose(scores, linears, budget, columns, n_blocks, None)
            per_block = np.zeros(n_blocks)
            for name, idx in chosen.items():
                b = next(b for b, n, _ in linears if n == name)
                per_block[b] += len(idx) * _unit_cost(model.get_submodule(name), columns)
            share = np.cumsum(per_block[::-1]) / max(per_block.sum(), 1)
            depth = int(np.argmax(share >= AUTO_DEPTH_SHARE - 1e-9)) + 1
            extra["all_block_shares"] = [round(float(v), 4) for v in per_block / max(per_block.sum(), 1)]
        if cfg.allocation == "even":
            top = [(name, m) for b, name, m in linears if b >= n_blocks - depth]
            share = budget / sum(m.weight.numel() for _, m in top)
            counts = {name: int(share * len(scores[name])) for name, _ in top}
        picked = _best_of_each(scores, counts) if counts is not None else \
            _choose(scores, linears, budget, columns, depth, emb_scores if cfg.embeddings else None, model)
        used = sum(len(idx) * _unit_cost(model.get_submodule(name), columns) for name, idx in picked.items())
        if not picked:
            smallest = min(_unit_cost(m, columns) for _, _, m in linears)
            raise UserError(f"method.budget={cfg.budget} is below one {'column' if columns else 'row'} "
                            f"({smallest} parameters) for this backbone")
        log.info("sparse: %d %s in %d matrices, depth %d, %d parameters (%.2f%% of %d), mining %.1fs, probe %.1fs",
                 sum(len(v) for v in picked.values()), "columns" if columns else "rows", len(picked), depth, used,
                 100 * used / backbone_params, backbone_params, self.timings["mining_seconds"],
                 self.timings["probe_seconds"])
        emb = _emb_name(emb_scores)
        lin = {k: v for k, v in picked.items() if k != emb}
        state = {"selector": cfg.selector, "budget": cfg.budget, "depth": depth, "selected_params": used,
                 "backbone_params": backbone_params, "granularity": "columns" if columns else "rows",
                 "rows": {} if columns else lin, **extra}
        if columns:
            state["columns"] = lin
        if emb in picked:
            state["rows"][emb] = picked[emb]
        state["per_block_params"] = _per_block(picked, linears, model, columns)
        return state

    def fit_head(self, model, batches: list[dict]) -> dict[str, torch.Tensor]:
        """probe_head_steps AdamW steps on the head alone (the backbone frozen, no dropout) over the probe
        batches, so that the probe's gradients flow back through a head that has begun to separate the classes
        instead of a random one. Returns the head's initial weights; the probe restores them afterwards."""
        head = {nm: p for nm, p in model.named_parameters() if is_head(nm)}
        init = {nm: p.detach().clone() for nm, p in head.items()}
        flags = {nm: p.requires_grad for nm, p in model.named_parameters()}
        for nm, p in model.named_parameters():
            p.requires_grad_(nm in head)
        was_training = model.training
        model.eval()
        opt = torch.optim.AdamW(head.values(), lr=self.cfg.lr, weight_decay=0.0)
        # the frozen backbone's output of each batch is computed once and replayed, so a step runs the head alone
        # (for the block families the frozen-bottom cache knows; others run the whole model every step)
        replay = bottom_cache.Replay(model) if bottom_cache.replayable(model) else None
        try:
            if replay is not None:
                batches = [{**b, bottom_cache.KEY: bottom_cache.bottom_output(model, b)} for b in batches]
            for step in range(self.cfg.probe_head_steps):
                opt.zero_grad(set_to_none=True)
                model(**batches[step % len(batches)]).loss.backward()
                opt.step()
        finally:
            if replay is not None:
                replay.remove()
            model.train(was_training)
            for nm, p in model.named_parameters():
                p.requires_grad_(flags[nm])
            for p in head.values():   # the last step's gradients would add to training's first (the Trainer clears
                p.grad = None         # them at its start; a caller stepping the model itself would not)
        return init

    def probe(self, model, context, groups, linears, rng, lowest: int = 0, kind: str | None = None):
        """Accumulate the selector's score (or `kind`'s) per output row and per input column of every linear layer
        in the blocks from `lowest` up: the backward pass starts at that block's input and costs nothing below it.
        Returns (row scores, column scores, embedding scores or None), each normalized by its matrix's mean."""
        cfg = self.cfg
        kind = kind or cfg.selector
        train, collator, tokenizer = context.train, context.collator, context.tokenizer
        bs = context.batch_size
        n = min(len(train), cfg.probe_batches * bs)
        idx = rng.choice(len(train), size=n, replace=False)
        enc = encode(tokenizer, [context.rows[i] for i in idx], context.max_length) if groups else None
        label_id = {name: i for i, name in enumerate(context.labels)}
        device = next(model.parameters()).device   # the training device: on a GPU the probe runs there

        row_s = {name: torch.zeros(m.out_features, dtype=torch.float64, device=device) for _, name, m in linears}
        col_s = {name: torch.zeros(m.in_features, dtype=torch.float64, device=device) for _, name, m in linears}
        emb = model.get_input_embeddings()
        emb_name = next(n for n, m in model.named_modules() if m is emb)
        vocab_grad = {}
        current = {}
        handles = []

        def keep_input(name, weight):
            def hook(module, inputs, output):
                x = inputs[0].detach()
                mask = current["mask"]

                def on_grad(g):
                    gm = g.detach().float() * mask.unsqueeze(-1)   # scores in fp32 over a bf16 backbone too
                    if kind == "token_fisher":   # sum over examples e of |G_e row|^2, G_e = sum_t g_t x_t^T,
                        xf = x.float()           # through the t x t Gram matrices (no b x o x i tensor)
                        gram_x, gram_g = xf @ xf.transpose(1, 2), gm @ gm.transpose(1, 2)
                        row_s[name] += torch.einsum("bto,btu,buo->o", gm, gram_x, gm).double()
                        col_s[name] += torch.einsum("bti,btu,bui->i", xf, gram_g, xf).double()
                        return
                    grad = torch.einsum("...o,...i->oi", gm, x.float()).double()
                    if kind == "token_x_weight":
                        taylor = grad * weight.detach().double()
                        row_s[name] += taylor.sum(1).pow(2)
                        col_s[name] += taylor.sum(0).pow(2)
                    else:
                        sq = grad.pow(2)
                        row_s[name] += sq.sum(1)
                        col_s[name] += sq.sum(0)
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
                acc = g.new_zeros(module.num_embeddings, g.shape[-1]).index_add_(0, flat, g)
                for t in current["group_ids"]:
                    vocab_grad[t] = vocab_grad.get(t, 0) + acc[t].double().pow(2).sum().item()
            out.register_hook(on_grad)
            return out

        def block_entry(module, args):
            return (args[0].detach().requires_grad_(True),) + tuple(args[1:])

        batches = [list(range(start, min(n, start + bs))) for start in range(0, n, bs)]
        collated = [{k: v.to(device) for k, v in collator([train[int(idx[i])] for i in b]).items()} for b in batches]
        head_init = self.fit_head(model, collated) if cfg.probe_head_steps else None
        for b, name, m in linears:
            if b >= lowest:
                handles.append(m.register_forward_hook(keep_input(name, m.weight)))
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
            for batch_idx, batch in zip(batches, collated):
                length = batch["input_ids"].shape[1]
                if groups is not None and kind != "all_positions":
                    masks = [position_mask(groups, enc, i, len(enc["input_ids"][i]),
                                           label_id[context.rows[int(idx[i])]["label"]]
                                           if kind == "token_contrastive" else None) for i in batch_idx]
                    mask = torch.zeros(len(batch_idx), length)
                    for row, m in enumerate(masks):
                        if tokenizer.padding_side == "left":
                            mask[row, length - len(m):] = torch.from_numpy(m)
                        else:
                            mask[row, :len(m)] = torch.from_numpy(m)
                else:
                    mask = batch["attention_mask"].float()
                mask = mask.to(device)
                if cfg.probe_readout:
                    read = readout_positions(model, batch["attention_mask"])
                    mask[torch.arange(len(mask), device=device), read] = 1.0
                current["mask"] = mask
                model(**batch).loss.backward()
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
            for nm, p in model.named_parameters():
                p.requires_grad_(flags[nm])
            if head_init is not None:   # training starts from the seed's head, as with every other selector
                with torch.no_grad():
                    for nm, p in model.named_parameters():
                        if nm in head_init:
                            p.copy_(head_init[nm])
        emb_scores = None
        if cfg.embeddings and vocab_grad:
            ids = np.array(sorted(vocab_grad))
            vals = np.array([vocab_grad[t] for t in ids])
            emb_scores = (emb_name, ids, vals / max(vals.mean(), 1e-30))
        return ({k: _normalized(v).cpu() for k, v in row_s.items()},
                {k: _normalized(v).cpu() for k, v in col_s.items()}, emb_scores)


@register
class SparseAllBlocks(Sparse):
    """sparse with rows in every block (method=sparse_all): the same token-driven selection and budget over the
    whole backbone. A backward through every block, so no frozen-bottom cache: 1.3-2.7x the top 2's training time.
    Its own method, not only method.depth=all, so that a comparison gives it its own lr grid, seeds, run folders and
    table row (the depth check at 1%: +7 test points on entity_matching, a tie on intent, -1.8 on trec)."""
    name = "sparse_all"

    @dataclasses.dataclass
    class Options(Sparse.Options):
        depth: Any = "all"

    def validate(self) -> None:
        super().validate()
        if self.cfg.depth != "all":
            raise UserError(f"method.depth={self.cfg.depth!r}: method=sparse_all puts rows in every block (depth "
                            "all); for fewer blocks use method=sparse method.depth=N")


def _normalized(v: torch.Tensor) -> torch.Tensor:
    """Scores over a matrix's mean, so that layers of different scale compete fairly."""
    return v / v.mean().clamp(min=1e-30)


def _unit_cost(module, columns: bool) -> int:
    """Parameters of one trainable unit: a row of a linear layer is in_features wide, a column out_features."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    return module.out_features if columns else module.in_features


def _emb_name(emb_scores) -> str | None:
    return emb_scores[0] if emb_scores is not None else None


def _best_of_each(scores: dict, counts: dict[str, int]) -> dict[str, list[int]]:
    """Each matrix's `counts[name]` best-scoring units (allocation even or probe)."""
    return {name: sorted(int(i) for i in np.argsort(-scores[name].numpy(), kind="stable")[:k])
            for name, k in sorted(counts.items()) if k}


def _choose(scores: dict, linears, budget: int, columns: bool, depth: int, emb_scores=None,
            model=None) -> dict[str, list[int]]:
    """The best-scoring units of the top `depth` blocks (and embedding rows) whose parameters fit the budget."""
    n_blocks = 1 + max(b for b, _, _ in linears)
    names, units, costs, values = [], [], [], []
    for b, name, m in linears:
        if b >= n_blocks - depth:
            s = scores[name].numpy()
            values.append(s)
            names += [name] * len(s)
            units.append(np.arange(len(s)))
            costs.append(np.full(len(s), _unit_cost(m, columns)))
    if emb_scores is not None:
        emb_name, emb_ids, emb_s = emb_scores
        values.append(emb_s)
        names += [emb_name] * len(emb_s)
        units.append(emb_ids)
        costs.append(np.full(len(emb_s), model.get_submodule(emb_name).embedding_dim))
    s, u, c = np.concatenate(values), np.concatenate(units), np.concatenate(costs)
    order = np.argsort(-s, kind="stable")
    chosen = order[np.cumsum(c[order]) <= budget]
    picked: dict[str, list[int]] = {}
    for i in chosen:
        picked.setdefault(names[i], []).append(int(u[i]))
    return {k: sorted(v) for k, v in sorted(picked.items())}


def _per_block(picked: dict, linears, model, columns: bool = False) -> dict:
    block_of = {name: b for b, name, _ in linears}
    per = {}
    for name, r in picked.items():
        width = _unit_cost(model.get_submodule(name), columns)
        key = f"block{block_of[name]}" if name in block_of else "embeddings"
        per[key] = per.get(key, 0) + len(r) * width
    return per
