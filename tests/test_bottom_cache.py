"""The frozen-bottom cache: one step with it equals one step without (loss, logits, delta gradients), on an encoder
and a decoder; any change to what it depends on rebuilds it; a damaged cache is rebuilt, never used; it applies
only where the bottom is fixed."""
from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import pytest
import torch

from conftest import run_tiny
from sparsetune_cli import bottom_cache
from sparsetune_cli.methods import get_method
from sparsetune_cli.models import load_model, transformer_blocks
from sparsetune_cli.train import prepare_model
from test_methods import setup

# sparse fits the head before its probe: the fit must leave no gradient behind for the step compared below
TOP_ONLY = {"sparse": ["method.depth=1", "method.probe_batches=2", "method.probe_head_steps=8"],
            "layer_select": ["method.num_blocks=1"],
            "head_only": []}


def prepared(backbone, method, data_dir, extra=()):
    cfg, tok, data, ds, collator, context = setup(backbone, method, data_dir,
                                                  [*TOP_ONLY[method], "train.frozen_dropout=false", *extra])
    model = prepare_model(cfg, get_method(cfg.method), load_model(cfg.backbone, len(data.labels), tok), context)
    return cfg, tok, ds, collator, model


def step(model, batch):
    model.train()
    torch.manual_seed(0)   # the same dropout masks in the top blocks (the bottom runs without dropout either way)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("backbone", ["tiny-encoder", "tiny-decoder"])
@pytest.mark.parametrize("method", sorted(TOP_ONLY))
def test_a_step_with_the_cache_equals_a_step_without(backbone, method, data_dir, tmp_path):
    cfg, tok, ds, collator, plain = prepared(backbone, method, data_dir)
    cached = copy.deepcopy(plain)
    sets, cache_collator, info = bottom_cache.attach(cfg, cached, tok, {"train": ds["train"],
                                                                      "validation": ds["validation"]},
                                                     collator, tmp_path)
    train = sets["train"]
    assert info["used"] and info["built"] and info["blocks"] == (2 if method == "head_only" else 1)
    rows = list(range(5, 21))
    want = step(plain, collator([ds["train"][i] for i in rows]))

    bottom_block = transformer_blocks(cached)[0][1]
    calls = []
    handle = next(bottom_block.children()).register_forward_hook(lambda *a: calls.append(1))
    with warnings.catch_warnings():   # the stores are read-only memory maps: no "not writable" warning per run
        warnings.simplefilter("error")
        batch = cache_collator([train[i] for i in rows])
    got = step(cached, batch)
    assert calls == [], "the frozen bottom ran although its output was cached"
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert got[2].keys() == want[2].keys() and got[2]
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-4, atol=1e-6)

    # evaluation: validation rows come from their own cache (their index counts on after train's rows)
    val = sets["validation"]
    assert val[0]["cache_index"] == len(train)
    plain.eval(), cached.eval()
    with torch.no_grad():
        want_logits = plain(**collator([ds["validation"][i] for i in range(8)])).logits
        got_logits = cached(**cache_collator([val[i] for i in range(8)])).logits
    assert calls == [], "the frozen bottom ran although its output was cached"
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-6)
    # batches without cached rows (evaluation, predict) run the whole model, bottom included
    cached.eval()
    with torch.no_grad():
        full = cached(**collator([ds["test"][i] for i in range(4)])).logits
        plain.eval()
        torch.testing.assert_close(full, plain(**collator([ds["test"][i] for i in range(4)])).logits)
    handle.remove()
    assert calls == [1]


def test_the_cache_applies_only_where_the_bottom_is_fixed(data_dir):
    for method, extra, reason in [("sparse", ["train.frozen_dropout=true"], "frozen_dropout=true"),
                                  ("sparse", ["train.cache_bottom=false"], "cache_bottom=false")]:
        cfg, tok, data, ds, collator, context = setup("tiny-encoder", method, data_dir, [*TOP_ONLY[method], *extra])
        model = get_method(cfg.method).prepare(load_model(cfg.backbone, len(data.labels), tok), context=context)
        assert reason in bottom_cache.why_not(cfg, model, tok)
    for method in ("full", "lora", "bitfit", "prefix"):
        cfg, tok, data, ds, collator, context = setup("tiny-encoder", method, data_dir, ["train.frozen_dropout=false"])
        model = get_method(cfg.method).prepare(load_model(cfg.backbone, len(data.labels), tok), context=context)
        assert "no whole block is frozen" in bottom_cache.why_not(cfg, model, tok), method


def test_any_change_to_what_the_bottom_depends_on_changes_the_key(data_dir):
    cfg, tok, ds, collator, model = prepared("tiny-encoder", "head_only", data_dir)
    key = bottom_cache.cache_key(model, ds["train"], cfg.task.max_length)
    assert bottom_cache.cache_key(model, ds["train"], cfg.task.max_length) == key   # stable
    assert bottom_cache.cache_key(model, ds["train"].select(range(10)), cfg.task.max_length) != key   # rows
    assert bottom_cache.cache_key(model, ds["train"], cfg.task.max_length - 1) != key   # max_length
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[5, 0] += 1e-3                    # the backbone's weights
    assert bottom_cache.cache_key(model, ds["train"], cfg.task.max_length) != key
    *_, two = prepared("tiny-encoder", "head_only", data_dir)
    *_, one = prepared("tiny-encoder", "layer_select", data_dir)                          # fewer frozen blocks
    assert bottom_cache.frozen_blocks(two) == 2 and bottom_cache.frozen_blocks(one) == 1
    assert bottom_cache.cache_key(one, ds["train"], cfg.task.max_length) != \
        bottom_cache.cache_key(two, ds["train"], cfg.task.max_length)


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_meta"])
def test_a_damaged_cache_is_detected_and_rebuilt(damage, data_dir, tmp_path, caplog):
    cfg, tok, ds, collator, model = prepared("tiny-encoder", "head_only", data_dir)
    _, _, info = bottom_cache.attach(cfg, copy.deepcopy(model), tok, {"train": ds["train"]}, collator, tmp_path)
    folder = tmp_path / info["folder"].rsplit("/", 1)[-1]
    good = np.load(folder / "hidden.npy").copy()
    data = folder / "hidden.npy"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:-100])
    elif damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[-5] ^= 0xFF
        data.write_bytes(bytes(raw))
    else:
        (folder / "meta.json").unlink()
    assert bottom_cache.problem(folder) is not None
    with caplog.at_level(logging.WARNING):
        _, _, again = bottom_cache.attach(cfg, copy.deepcopy(model), tok, {"train": ds["train"]}, collator, tmp_path)
    assert again["built"] and "cannot be used" in caplog.text
    assert bottom_cache.problem(folder) is None and np.array_equal(np.load(folder / "hidden.npy"), good)


def test_two_builds_of_one_cache_both_end_with_a_whole_cache(data_dir, tmp_path):
    cfg, tok, ds, collator, model = prepared("tiny-encoder", "head_only", data_dir)
    folder = tmp_path / bottom_cache.cache_key(model, ds["train"], cfg.task.max_length)
    bottom_cache.build(model, ds["train"], collator, 32, folder)
    bottom_cache.build(model, ds["train"], collator, 32, folder)   # the second finds the first's in place
    assert bottom_cache.problem(folder) is None and [p.name for p in tmp_path.iterdir()] == [folder.name]


@pytest.mark.parametrize("backbone", ["tiny-encoder", "tiny-decoder"])
def test_a_run_with_the_cache_records_the_same_metrics_and_a_sweep_reuses_it(backbone, data_dir, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setattr(bottom_cache, "cache_root", lambda: tmp_path / "cache")
    base = [f"backbone={backbone}", "method=sparse", *TOP_ONLY["sparse"], f"data_dir={data_dir}", "task=banking77"]
    off, _ = run_tiny(tmp_path / "off", [*base, "train.cache_bottom=false"])
    on, _ = run_tiny(tmp_path / "on", base)
    again, _ = run_tiny(tmp_path / "again", [*base, "method.lr=0.01"])   # another lr point: the same cache
    assert off["cost"]["cached_blocks"] == 0 and on["cost"]["cached_blocks"] == 1
    assert on["cost"]["cache_built"] and not again["cost"]["cache_built"]
    assert on["metrics"] == off["metrics"]
    assert [h["accuracy"] for h in on["history"]] == [h["accuracy"] for h in off["history"]]
