"""The frozen bottom, computed once (train.cache_bottom).

When everything that trains lies in the top blocks and the head (sparse, layer_select, head_only) and the
blocks below run without dropout, the bottom (embeddings and the frozen blocks) computes the same output for
an example in every epoch, learning rate and seed. Its output for every training example is computed once,
stored on disk (memory-mapped, fp32: the numbers are exactly what the bottom computes) under a hash of
everything it depends on, and reused: a training step then runs only the top blocks and the head. The validation
and test rows get a cache of their own the same way, so evaluation runs only the top too.

How: the bottom modules keep their weights and names (saving, merging and predict never see the cache), but
while a batch that carries its cached bottom output runs, the embeddings return zeros, the frozen blocks below
the last pass their input through, and the last frozen block returns the cached output. Everything else
(attention masks, rotary position inputs, the top blocks, pooling and head) is the model's own code, so the
result is the uncached one. Batches without it (the sparse probe, predict) run the whole model. That switch is
`Replay`; the sparse probe's head fit uses it alone, with each probe batch's bottom output held in memory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from .models import frozen_bottom, transformer_blocks
from .record import file_sha256

log = logging.getLogger(__name__)
VERSION = 1
FAMILIES = ("bert", "llama")   # tested: a block takes (hidden, mask, ...) and returns hidden; right padding
KEY = "cached_bottom"          # the batch entry the collator adds and the model's pre-hook takes out
INDEX = "cache_index"          # the dataset column naming each row's place in the caches (all splits, in order)


def why_not(cfg, model, tokenizer) -> str | None:
    """Why the cache does not apply to this run, or None when it does."""
    if not cfg.train.get("cache_bottom", True):
        return "train.cache_bottom=false"
    if cfg.train.frozen_dropout:
        return "train.frozen_dropout=true: dropout makes the bottom's output differ at every step"
    if not replayable(model):
        return f"backbone family {model.config.model_type!r} is not one the cache knows ({', '.join(FAMILIES)})"
    if getattr(tokenizer, "padding_side", "right") != "right":
        return "the tokenizer pads on the left: positions would depend on the batch"
    if frozen_blocks(model) == 0:
        return "no whole block is frozen (what trains reaches the bottom block or the embeddings)"
    return None


def replayable(model) -> bool:
    """Whether Replay can stand in for this model's bottom: a block family it is tested on."""
    return model.config.model_type in FAMILIES


def frozen_blocks(model) -> int:
    names = {n for n, _ in transformer_blocks(model)}
    return sum(n in names for n, _ in frozen_bottom(model))


def cache_key(model, train, max_length: int) -> str:
    """A hash of what the bottom's output depends on: the tokenized rows (so the data, tokenizer and max_length),
    the bottom's weights, how many blocks it has, and the storage dtype."""
    h = hashlib.sha256(json.dumps({"version": VERSION, "model_type": model.config.model_type, "dtype": "fp32",
                                   "blocks": frozen_blocks(model), "max_length": max_length}).encode())
    for column in sorted(c for c in train.column_names if c in ("input_ids", "token_type_ids", "attention_mask")):
        h.update(column.encode())
        h.update(np.concatenate([np.asarray(r, dtype=np.int64) for r in train[column]]).tobytes())
        h.update(np.asarray([len(r) for r in train[column]], dtype=np.int64).tobytes())
    for name, module in frozen_bottom(model):
        for pname, t in module.state_dict().items():
            h.update(f"{name}.{pname}".encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def cache_root() -> Path:
    """Beside the tokenized cache, in the datasets cache (HF_DATASETS_CACHE or HF_HOME moves both). Deleting
    either folder is safe at any time but during a run's start: a missing entry is rebuilt."""
    from datasets import config
    return Path(config.HF_DATASETS_CACHE) / "sparsetune-bottom"


class _Stop(Exception):
    """Raised once the last frozen block has run: the rest of the forward is not needed to build the cache."""


def bottom_output(model, batch: dict, last: torch.nn.Module | None = None) -> torch.Tensor:
    """The output of the frozen bottom's last module (by default frozen_bottom's) for one batch; nothing above it
    runs."""
    last = frozen_bottom(model)[-1][1] if last is None else last
    captured = {}

    def grab(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _Stop
    handle = last.register_forward_hook(grab)
    try:
        with torch.no_grad():
            model(**batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


def build(model, train, collator, batch_size: int, folder: Path) -> None:
    """Compute the bottom's output of every training row and store it in folder (written under a temporary name,
    then renamed: a partial cache never has the final name, and two jobs building at once both end well)."""
    last = frozen_bottom(model)[-1][1]
    lengths = np.asarray([len(r) for r in train["input_ids"]], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    hidden = model.config.hidden_size
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        out = np.lib.format.open_memmap(tmp / "hidden.npy", mode="w+", dtype=np.float32,
                                        shape=(int(offsets[-1]), hidden))
        was_training = model.training
        model.eval()
        order = np.argsort(-lengths, kind="stable")   # similar lengths together: little padding
        device = next(model.parameters()).device
        try:
            for start in range(0, len(order), batch_size):
                rows = [int(i) for i in order[start:start + batch_size]]
                batch = collator([{k: train[i][k] for k in train.column_names if k != "labels"} for i in rows])
                h = bottom_output(model, {k: v.to(device) for k, v in batch.items() if k != INDEX}, last)
                h = h.float().cpu().numpy()
                for j, i in enumerate(rows):
                    out[offsets[i]:offsets[i + 1]] = h[j, :lengths[i]]
        finally:
            model.train(was_training)
        out.flush()
        del out
        np.save(tmp / "offsets.npy", offsets)
        (tmp / "meta.json").write_text(json.dumps({"version": VERSION, "rows": len(lengths), "hidden": hidden,
                                                   "sha256": file_sha256(tmp / "hidden.npy")}))
        try:
            tmp.rename(folder)
        except OSError:   # another job finished the same cache first: use that one
            if problem(folder) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def problem(folder: Path) -> str | None:
    """Why a cache folder cannot be used (partial, truncated or changed since it was written), or None."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        offsets = np.load(folder / "offsets.npy")
        hidden = np.load(folder / "hidden.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        return f"unreadable ({type(e).__name__})"
    if meta.get("version") != VERSION or hidden.shape != (int(offsets[-1]), meta["hidden"]):
        return "its shape does not match its index"
    if file_sha256(folder / "hidden.npy") != meta.get("sha256"):
        return "its contents changed since it was written"
    return None


class Replay:
    """The frozen bottom switched to replay its output: while a batch that carries it under KEY runs, the embeddings
    return zeros, the frozen blocks below the last pass their input through, and the last returns the given output.
    Batches without it run the whole model. remove() restores the modules."""

    def __init__(self, model):
        self.current: torch.Tensor | None = None
        self.originals = []
        bottom = frozen_bottom(model)
        blocks = {n for n, _ in transformer_blocks(model)}
        last = bottom[-1][1]
        for name, module in bottom:
            if module is last:
                self._patch(module, lambda module, hidden, *a, **k: self.current.to(hidden.dtype))
            elif name in blocks:
                self._patch(module, lambda module, hidden, *a, **k: hidden)   # the cached output replaces it anyway
            else:   # embeddings: only the shape matters to the code that follows
                self._patch(module, lambda module, *a, **k: self.current.new_zeros(self.current.shape))
        self.hooks = [model.register_forward_pre_hook(self._take, with_kwargs=True),
                      model.register_forward_hook(self._clear)]

    def _patch(self, module, replacement) -> None:
        original = module.forward
        self.originals.append((module, "forward" in vars(module), original))

        def forward(mod, *args, **kwargs):
            return replacement(mod, *args, **kwargs) if self.current is not None else original(*args, **kwargs)
        module.forward = types.MethodType(forward, module)

    def _take(self, model, args, kwargs):
        self.current = kwargs.pop(KEY, None)
        return args, kwargs

    def _clear(self, model, args, output):
        # the backward pass needs no bottom: only the forward reads the cached tensor
        self.current = None

    def remove(self) -> None:
        for module, own, original in reversed(self.originals):
            if own:
                module.forward = original
            else:
                del module.forward   # back to the class's method
        for hook in self.hooks:
            hook.remove()


class BottomCache:
    """Built caches attached to a model: a collator that adds each batch's cached bottom output, and the bottom
    modules switched to use it when it is there. One store per split; a row's index counts across them in order."""

    def __init__(self, folders: list[Path], model, collator):
        self.stores = [(np.load(f / "hidden.npy", mmap_mode="r"), np.load(f / "offsets.npy")) for f in folders]
        self.starts = np.cumsum([0] + [len(offsets) - 1 for _, offsets in self.stores])
        self.base_collator = collator
        self.replay = Replay(model)

    def rows(self, i: int) -> np.ndarray:
        store = int(np.searchsorted(self.starts, i, side="right")) - 1
        hidden, offsets = self.stores[store]
        j = i - self.starts[store]
        return np.asarray(hidden[offsets[j]:offsets[j + 1]])

    def __call__(self, features: list[dict]) -> dict:
        index = [f.pop(INDEX) for f in features if INDEX in f]
        batch = self.base_collator(features)
        if index and len(index) == len(features):
            ids = batch["input_ids"]
            # filled in numpy: the stores are read-only memory maps, which torch.from_numpy warns about
            cached = np.zeros((ids.shape[0], ids.shape[1], self.stores[0][0].shape[1]), dtype=np.float32)
            for j, i in enumerate(index):
                rows = self.rows(i)
                cached[j, :len(rows)] = rows
            batch[KEY] = torch.from_numpy(cached)
        return batch


def _ready(cfg, model, rows, collator, root: Path) -> tuple[Path, bool]:
    """The cache folder of these rows, built when missing and rebuilt when damaged; (folder, built)."""
    folder = Path(root) / cache_key(model, rows, cfg.task.max_length)
    if folder.exists():
        bad = problem(folder)
        if bad is not None:
            log.warning("frozen-bottom cache %s cannot be used (%s): rebuilding it", folder, bad)
            shutil.rmtree(folder, ignore_errors=True)
    if not folder.exists():
        build(model, rows, collator, cfg.train.eval_batch_size, folder)
        return folder, True
    return folder, False


def attach(cfg, model, tokenizer, splits: dict, collator, root: Path):
    """(the splits, collator, what to record) for this run: with every split's cache when it applies (building
    it when it is missing, rebuilding it when it is damaged), else unchanged with the reason."""
    reason = why_not(cfg, model, tokenizer)
    if reason is not None:
        log.info("frozen-bottom cache not used: %s", reason)
        return splits, collator, {"used": False, "reason": reason}
    t0 = time.perf_counter()
    folders, built = zip(*(_ready(cfg, model, rows, collator, root) for rows in splits.values()))
    info = {"used": True, "blocks": frozen_blocks(model), "built": any(built), "folder": str(folders[0]),
            "seconds": time.perf_counter() - t0}
    log.info("frozen-bottom cache of %s %s: the bottom %d blocks run once (%.1fs)", ", ".join(splits),
             "built" if any(built) else "reused", info["blocks"], info["seconds"])
    cache = BottomCache(list(folders), model, collator)
    out, start = {}, 0
    for name, rows in splits.items():
        out[name] = rows.add_column(INDEX, list(range(start, start + len(rows))))
        start += len(rows)
    return out, cache, info
