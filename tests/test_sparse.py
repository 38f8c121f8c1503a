"""The sparse method: frozen weights stay bit-identical, merge gives the same logits with the base
architecture, the budget holds, every selector runs, the backward stops at the selected depth,
and the token report of a real task reads as its semantics (and scripts/weight_change.py finds where it trained)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import run_tiny
from sparsetune_cli.methods import count_params, get_method
from sparsetune_cli.methods.sparse import SELECTORS, DeltaLinear, block_linears
from sparsetune_cli.models import is_head, load_model, transformer_blocks
from sparsetune_cli.predict import load_run, merge
from test_methods import setup


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("sparse")
    record, run_dir = run_tiny(tmp, ["method=sparse", "task=banking77", f"data_dir={data_dir}", "method.budget=0.005",
                                     "method.lr=1e-2"])
    assert record["status"] == "completed"
    return record, run_dir


def test_weights_outside_selected_rows_are_bit_identical_after_training(sparse_run, tmp_path):
    assert_only_selected_rows_changed(sparse_run[1])


def test_embedding_rows_of_group_tokens_train_and_merge(tmp_path, data_dir):
    """embeddings=true: group tokens' embedding rows compete for the budget, train as deltas like block rows (all
    else bit-identical) and merge into the plain model."""
    record, run_dir = run_tiny(tmp_path, ["method=sparse", "task=banking77", f"data_dir={data_dir}",
                                          "method.budget=0.02", "method.embeddings=true", "method.lr=1e-2"])
    assert record["status"] == "completed"
    rows = json.loads((run_dir / "model" / "method_state.json").read_text())["state"]["rows"]
    assert any(name.endswith("word_embeddings") for name in rows), rows.keys()
    changed = assert_only_selected_rows_changed(run_dir)
    assert any(name.endswith("word_embeddings.weight") for name in changed)
    assert_merge_gives_the_same_logits(run_dir, tmp_path)


def assert_only_selected_rows_changed(run_dir) -> set[str]:
    """The merged model equals the base except in the selected rows, some of which trained; returns the tensors
    with a changed row."""
    run = load_run(run_dir)
    base = load_model(run.cfg.backbone, len(run.labels), run.tokenizer, seed=0).state_dict()
    rows = json.loads((run_dir / "model" / "method_state.json").read_text())["state"]["rows"]
    merged = run.method.export(run.model).state_dict()
    changed_rows, changed = 0, set()
    for name, tensor in merged.items():
        if is_head(name):
            continue
        module = name.rsplit(".", 1)[0]
        if module in rows and name.endswith(".weight"):
            selected = torch.zeros(tensor.shape[0], dtype=torch.bool)
            selected[rows[module]] = True
            assert torch.equal(tensor[~selected], base[name][~selected]), name
            n = int((tensor[selected] != base[name][selected]).any(1).sum())
            changed_rows += n
            changed |= {name} if n else set()
        else:
            assert torch.equal(tensor, base[name]), f"{name} drifted"
    assert changed_rows > 0, "no selected row was trained"
    return changed


def test_merged_model_loads_without_sparsetune_and_gives_the_same_logits(sparse_run, tmp_path):
    assert_merge_gives_the_same_logits(sparse_run[1], tmp_path)


def assert_merge_gives_the_same_logits(run_dir, tmp_path):
    """`merge` writes a plain model of the base architecture whose logits equal the trained run's."""
    run = load_run(run_dir)
    batch = run.tokenizer(["I lost my card", "how do I top up by transfer"], padding=True, return_tensors="pt")
    batch = {k: v for k, v in batch.items() if k != "token_type_ids" or "token_type_ids" in batch}
    with torch.no_grad():
        sparse_logits = run.model(**batch).logits
    merge(run, tmp_path / "merged")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, DeltaLinear) for m in plain.modules())
    base = load_model(run.cfg.backbone, len(run.labels), run.tokenizer)
    assert type(plain) is type(base)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, sparse_logits, rtol=1e-5, atol=1e-5)
    assert plain.config.id2label[0] == run.labels[0]


def test_selection_respects_the_budget_and_is_recorded(sparse_run):
    record, run_dir = sparse_run
    state = json.loads((run_dir / "model" / "method_state.json").read_text())["state"]
    assert 0 < state["selected_params"] <= 0.005 * state["backbone_params"]
    assert record["cost"]["trainable_params_without_head"] == state["selected_params"]
    assert record["cost"]["mining_seconds"] > 0 and record["cost"]["probe_seconds"] > 0
    assert (run_dir / "token_groups.md").is_file() and (run_dir / "token_groups.json").is_file()


@pytest.mark.parametrize("backbone", ["tiny-encoder", "tiny-decoder"])
def test_every_selector_runs_within_budget(backbone, data_dir):
    selections = {}
    for selector in SELECTORS:
        cfg, tok, data, ds, collator, context = setup(backbone, "sparse", data_dir,
                                                      [f"method.selector={selector}", "method.budget=0.005",
                                                       "method.probe_batches=2"])
        model = load_model(cfg.backbone, len(data.labels), tok)
        method = get_method(cfg.method)
        model = method.prepare(model, context=context)
        state = method.state
        assert 0 < state["selected_params"] <= 0.005 * state["backbone_params"]
        assert count_params(model)["trainable_params_without_head"] == state["selected_params"]
        selections[selector] = state["rows"]
    assert len({json.dumps(s, sort_keys=True) for s in selections.values()}) == len(SELECTORS)


def test_no_backward_below_the_selected_depth(data_dir):
    cfg, tok, data, ds, collator, context = setup("tiny-encoder", "sparse", data_dir,
                                                  ["method.depth=1", "method.probe_batches=2"])
    model = get_method(cfg.method).prepare(load_model(cfg.backbone, len(data.labels), tok), context=context)
    blocks = transformer_blocks(model)
    assert all(name.startswith(blocks[-1][0] + ".") for name in context_rows(model))
    seen = {}
    blocks[0][1].register_forward_hook(lambda m, i, o: seen.setdefault("bottom", o[0] if isinstance(o, tuple) else o))
    blocks[-1][1].register_forward_hook(lambda m, i, o: seen.setdefault("top", o[0] if isinstance(o, tuple) else o))
    model(**collator([ds["train"][i] for i in range(4)]))
    assert not seen["bottom"].requires_grad and seen["top"].requires_grad


def context_rows(model):
    return [n for n, m in model.named_modules() if isinstance(m, DeltaLinear)]


def test_token_report_of_banking77_reads_as_its_classes(data_dir):
    from conftest import compose
    from sparsetune_cli.tokens import token_report
    report = token_report(compose(["task=banking77", f"data_dir={data_dir}"]))
    per_class = {c: " ".join(e["group"] for e in entries) for c, entries in report["per_class"].items()}
    assert "card" in per_class["card_arrival"] or "arrive" in per_class["card_arrival"]
    assert "top" in per_class["top_up_failed"] or "top" in per_class["top_up_reverted"]
    assert "transfer" in per_class["transfer_not_received_by_recipient"] + per_class["transfer_timing"]
    assert "pin" in per_class["change_pin"]
    assert "exchange" in per_class["exchange_rate"] or "rate" in per_class["exchange_rate"]
    assert "# Token groups" in report["markdown"] and "| change_pin |" in report["markdown"]


def test_row_delta_gradients_match_autograd_of_the_plain_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).double()
    layer = DeltaLinear(base, torch.tensor([1, 3]))
    with torch.no_grad():
        layer.delta.normal_()
    x = torch.randn(2, 4, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, d: torch.nn.functional.linear(
        x, base.weight.index_add(0, layer.rows, d), base.bias), (x, layer.delta.detach().clone().requires_grad_()))
    y = layer(x)
    reference = torch.nn.functional.linear(x, base.weight.index_add(0, layer.rows, layer.delta), base.bias)
    assert torch.allclose(y, reference)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.delta), g)
    want = torch.autograd.grad(reference, (x, layer.delta), g)
    assert all(torch.allclose(a, b) for a, b in zip(got, want))
    assert base.weight.grad is None


def test_the_row_deltas_live_on_their_weights_device():
    """The probe and the swap run on the training device (a GPU): an index left on the CPU beside a GPU weight
    fails index_add. The meta device stands in for the GPU here; scripts/gpu_check.py runs it on one."""
    from sparsetune_cli.methods.sparse import RowDeltaEmbedding
    linear = DeltaLinear(torch.nn.Linear(6, 5, device="meta"), torch.tensor([1, 3]))
    emb = RowDeltaEmbedding(torch.nn.Embedding(9, 4, device="meta"), torch.tensor([2, 7]))
    assert {t.device.type for t in (linear.rows, linear.delta, emb.rows, emb.slot, emb.delta)} == {"meta"}


@pytest.mark.parametrize("backbone", ["tiny-encoder", "tiny-decoder"])
def test_probe_scores_of_the_top_blocks_do_not_depend_on_where_the_backward_starts(backbone, data_dir):
    import numpy as np
    from sparsetune_cli.methods.sparse import block_linears
    from sparsetune_cli.tokens import mine
    cfg, tok, data, ds, collator, context = setup(backbone, "sparse", data_dir)
    model = load_model(cfg.backbone, len(data.labels), tok, seed=0)
    method = get_method(cfg.method)
    groups = mine(context.rows, data.labels, tok, cfg.task.max_length, 200, 2, 2)
    linears = block_linears(model)
    n = len(transformer_blocks(model))
    whole, whole_cols, _ = method.probe(model, context, groups, linears, np.random.default_rng(0), lowest=0)
    top, top_cols, _ = method.probe(model, context, groups, linears, np.random.default_rng(0), lowest=n - 2)
    kept = [name for b, name, _ in linears if b >= n - 2]
    assert any(top[name].sum() > 0 for name in kept)
    for name in kept:   # the same scores for every matrix of the top blocks, rows and columns
        assert torch.allclose(whole[name], top[name], rtol=1e-5, atol=1e-12), name
        assert torch.allclose(whole_cols[name], top_cols[name], rtol=1e-5, atol=1e-12), name


def test_fisher_scores_equal_the_batch_scores_when_each_batch_is_one_example(data_dir):
    """token_fisher sums squared per-example gradients (through Gram matrices); with one example per batch that is
    exactly what token sums, so the two must agree, for rows and columns."""
    import numpy as np
    from sparsetune_cli.methods.sparse import block_linears
    from sparsetune_cli.tokens import mine
    scores = {}
    for selector in ("token", "token_fisher"):
        cfg, tok, data, ds, collator, context = setup("tiny-encoder", "sparse", data_dir,
                                                      [f"method.selector={selector}", "method.probe_batches=16",
                                                       "train.batch_size=1"])
        model = load_model(cfg.backbone, len(data.labels), tok, seed=0)
        groups = mine(context.rows, data.labels, tok, cfg.task.max_length, 200, 2, 2)
        scores[selector] = get_method(cfg.method).probe(model, context, groups, block_linears(model),
                                                        np.random.default_rng(0))[:2]
    for kind in (0, 1):
        assert any(v.sum() > 0 for v in scores["token"][kind].values())
        for name, v in scores["token"][kind].items():
            assert torch.allclose(v, scores["token_fisher"][kind][name], rtol=1e-4, atol=1e-10), name


def test_contrastive_mask_keeps_only_groups_of_the_examples_label_weighted_by_their_score():
    from sparsetune_cli.tokens import TokenGroups, position_mask
    groups = TokenGroups(groups=[(11,), (12,)], scores=[4.0, 2.0], classes=[0, 1], counts=[5, 5], max_ngram=1)

    class Enc(dict):   # the two BatchEncoding methods example_grams reads: one text of three one-token words
        def sequence_ids(self, i):
            return [None, 0, 0, 0, None]

        def word_ids(self, i):
            return [None, 0, 1, 2, None]
    enc = Enc({"input_ids": [[101, 11, 12, 13, 102]]})
    assert position_mask(groups, enc, 0, 5).tolist() == [0, 1, 1, 0, 0]
    assert position_mask(groups, enc, 0, 5, label=0).tolist() == [0, 4, 0, 0, 0]
    assert position_mask(groups, enc, 0, 5, label=1).tolist() == [0, 0, 2, 0, 0]


def test_columns_train_only_the_selected_input_features_and_merge_exactly(data_dir):
    cfg, tok, data, ds, collator, context = setup("tiny-encoder", "sparse", data_dir,
                                                  ["method.granularity=columns", "method.budget=0.01",
                                                   "method.probe_batches=2"])
    model = load_model(cfg.backbone, len(data.labels), tok)
    method = get_method(cfg.method)
    model = method.prepare(model, context=context)
    state = method.state
    assert state["granularity"] == "columns" and state["columns"] and not state["rows"]
    assert count_params(model)["trainable_params_without_head"] == state["selected_params"] <= \
        0.01 * state["backbone_params"]
    layers = [m for m in model.modules() if isinstance(m, DeltaLinear)]
    assert layers and all(m.dim == 1 and m.delta.shape == (m.out_features, len(m.rows)) for m in layers)
    batch = collator([ds["train"][i] for i in range(4)])
    with torch.no_grad():
        for m in layers:
            m.delta.normal_()
        model.eval()
        before = model(**batch).logits
        merged = method.export(model)
        torch.testing.assert_close(merged(**batch).logits, before, rtol=1e-5, atol=1e-5)


def test_auto_depth_takes_the_top_blocks_that_hold_most_of_an_all_block_selection(data_dir):
    cfg, tok, data, ds, collator, context = setup("tiny-encoder", "sparse", data_dir,
                                                  ["method.depth=auto", "method.probe_batches=2"])
    method = get_method(cfg.method)
    model = method.prepare(load_model(cfg.backbone, len(data.labels), tok), context=context)
    state = method.state
    shares = state["all_block_shares"]
    n = len(shares)
    assert 1 <= state["depth"] <= n and sum(shares[n - state["depth"]:]) >= 0.75 - 1e-6
    assert state["depth"] == 1 or sum(shares[n - state["depth"] + 1:]) < 0.75
    lowest = n - state["depth"]
    block_of = {name: b for b, name, _ in block_linears(model)}
    assert all(block_of[name] >= lowest for name in state["rows"])


def test_sparse_all_is_sparse_with_rows_in_every_block(data_dir):
    """method=sparse_all picks what method=sparse method.depth=all picks, under its own name (its own run folders,
    lr grid and table row); a depth other than all is refused with the method that takes one."""
    from conftest import compose
    from sparsetune_cli.errors import UserError
    states = {}
    for label, method, extra in (("sparse_all", "sparse_all", []), ("sparse depth=all", "sparse", ["method.depth=all"]),
                                 ("sparse depth=1", "sparse", ["method.depth=1"])):
        cfg, tok, data, ds, collator, context = setup("tiny-encoder", method, data_dir,
                                                      ["method.probe_batches=2", "method.lr=1e-3", *extra])
        chosen = get_method(cfg.method)
        model = chosen.prepare(load_model(cfg.backbone, len(data.labels), tok), context=context)
        states[label] = chosen.state
    n_blocks = len(transformer_blocks(model))
    assert states["sparse_all"] == states["sparse depth=all"] != states["sparse depth=1"]
    assert states["sparse_all"]["depth"] == n_blocks == 2   # the tiny encoder's: rows in both blocks
    block_of = {name: b for b, name, _ in block_linears(model)}
    assert {block_of[name] for name in states["sparse_all"]["rows"]} == set(range(n_blocks))
    with pytest.raises(UserError, match="method=sparse_all puts rows in every block.*method=sparse method.depth=N"):
        get_method(compose(["method=sparse_all", "method.depth=2"]).method)


def test_auto_depth_needs_a_probed_selector():
    from conftest import compose
    from sparsetune_cli.errors import UserError
    with pytest.raises(UserError, match="depth=auto needs a probed selector"):
        get_method(compose(["method=sparse", "method.depth=auto", "method.selector=random"]).method)


def test_column_delta_gradients_match_autograd_of_the_plain_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).double()
    layer = DeltaLinear(base, torch.tensor([0, 4]), dim=1)
    with torch.no_grad():
        layer.delta.normal_()
    x = torch.randn(2, 4, 6, dtype=torch.double, requires_grad=True)
    reference = torch.nn.functional.linear(x, base.weight.index_add(1, layer.rows, layer.delta), base.bias)
    y = layer(x)
    assert torch.allclose(y, reference)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.delta), g)
    want = torch.autograd.grad(reference, (x, layer.delta), g)
    assert all(torch.allclose(a, b) for a, b in zip(got, want))


def test_a_head_fitted_before_the_probe_changes_the_rows_not_the_head(data_dir):
    """probe_head_steps: the probe's gradients pass through a head fitted on the probe batches, which moves the
    choice of rows; training then starts from the seed's own head, as it does for every other selector."""
    chosen = {}
    for steps in (0, 20):
        cfg, tok, data, ds, collator, context = setup("tiny-encoder", "sparse", data_dir,
                                                      ["method.budget=0.005", "method.probe_batches=2",
                                                       f"method.probe_head_steps={steps}", "method.lr=0.05"])
        model = load_model(cfg.backbone, len(data.labels), tok, seed=0)
        head = {n: p.detach().clone() for n, p in model.named_parameters() if is_head(n)}
        model = get_method(cfg.method).prepare(model, context=context)
        after = {n: p for n, p in model.named_parameters() if is_head(n)}
        assert head.keys() == after.keys() and all(torch.equal(head[n], after[n]) for n in head)
        assert all(p.requires_grad for p in after.values())
        chosen[steps] = json.dumps({n: m.rows.tolist() for n, m in model.named_modules()
                                    if isinstance(m, DeltaLinear)}, sort_keys=True)
    assert chosen[0] != chosen[20]


def test_the_readout_is_cls_for_encoders_and_the_last_real_token_for_decoders():
    from types import SimpleNamespace
    from sparsetune_cli.methods.sparse import readout_positions
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert readout_positions(SimpleNamespace(score=None), mask).tolist() == [2, 4, 4]   # right and left padding
    assert readout_positions(SimpleNamespace(classifier=None), mask).tolist() == [0, 0, 0]


def test_scoring_the_readout_lets_the_top_blocks_feed_forward_compete(data_dir, monkeypatch):
    """Without the readout the top block's feed-forward rows score 0 (group positions' outputs there never reach
    the loss, which reads [CLS]); with it they score."""
    import sparsetune_cli.methods.sparse as sparse
    scores, choose = {}, sparse._choose
    monkeypatch.setattr(sparse, "_choose", lambda s, *a, **k: scores.update(s) or choose(s, *a, **k))
    top_ffn = {}
    for readout in (False, True):
        cfg, tok, data, ds, collator, context = setup("tiny-encoder", "sparse", data_dir,
                                                      ["method.probe_batches=2", "method.depth=1",
                                                       f"method.probe_readout={readout}"])
        get_method(cfg.method).prepare(load_model(cfg.backbone, len(data.labels), tok), context=context)
        top = transformer_blocks(load_model(cfg.backbone, len(data.labels), tok))[-1][0]
        top_ffn[readout] = [float(v.max()) for n, v in scores.items()
                            if n.startswith(top + ".") and ("intermediate" in n or n.endswith(".output.dense"))
                            and "attention" not in n]
    assert len(top_ffn[True]) == 2 and max(top_ffn[False]) == 0 and min(top_ffn[True]) > 0


@pytest.mark.parametrize("backbone", ["tiny-encoder", "tiny-decoder"])
def test_the_head_fit_replays_the_frozen_backbone_with_the_same_result(backbone, data_dir, monkeypatch):
    """fit_head runs the backbone once per probe batch and replays its output, so a step runs the head alone; the
    head it fits is the one whole-model steps fit, and the model's modules are plain again afterwards."""
    import copy
    from sparsetune_cli import bottom_cache
    cfg, tok, data, ds, collator, context = setup(backbone, "sparse", data_dir, ["method.probe_head_steps=6",
                                                                                "method.lr=0.05"])
    model = load_model(cfg.backbone, len(data.labels), tok)
    batches = [collator([ds["train"][i] for i in range(start, start + 8)]) for start in (0, 8, 16)]
    replayed, whole = copy.deepcopy(model), copy.deepcopy(model)
    get_method(cfg.method).fit_head(replayed, batches)
    monkeypatch.setattr(bottom_cache, "FAMILIES", ())   # a family the cache does not know: whole-model steps
    get_method(cfg.method).fit_head(whole, batches)
    fitted = {n: p for n, p in replayed.named_parameters() if is_head(n)}
    assert any(not torch.equal(p, dict(model.named_parameters())[n]) for n, p in fitted.items())
    for n, p in whole.named_parameters():
        torch.testing.assert_close(dict(replayed.named_parameters())[n], p, rtol=1e-4, atol=1e-5)
    assert not any("forward" in vars(m) for m in replayed.modules())
    assert not replayed._forward_hooks and not replayed._forward_pre_hooks


def test_even_allocation_gives_every_top_matrix_the_same_share(data_dir):
    """allocation=even: each matrix of the top blocks trains the same share of its rows (to one row), where one
    ranking of all rows (by_score) concentrates them; it refuses embeddings=true, which has no such share."""
    from sparsetune_cli.errors import UserError
    shares = {}
    for allocation in ("by_score", "even"):
        cfg, tok, data, ds, collator, context = setup("tiny-encoder", "sparse", data_dir,
                                                      ["method.budget=0.01", "method.probe_batches=2",
                                                       f"method.allocation={allocation}"])
        model = get_method(cfg.method).prepare(load_model(cfg.backbone, len(data.labels), tok), context=context)
        top = [n for b, n, _ in block_linears(model) if b >= len(transformer_blocks(model)) - 2]
        rows = {n: m for n, m in model.named_modules() if isinstance(m, DeltaLinear)}
        shares[allocation] = [len(rows[n].rows) / rows[n].weight.shape[0] if n in rows else 0.0 for n in top]
    assert min(shares["even"]) > 0 and max(shares["even"]) - min(shares["even"]) < 1 / 16
    assert max(shares["by_score"]) - min(shares["by_score"]) > 0.1
    cfg, *_ = setup("tiny-encoder", "sparse", data_dir, ["method.allocation=even", "method.embeddings=true"])
    with pytest.raises(UserError, match="allocation=even"):
        get_method(cfg.method).validate()


def test_probe_allocation_fills_the_token_probes_matrices_with_the_selectors_rows(data_dir):
    """allocation=probe: each matrix gets as many rows as the token probe (same seed, same probe) gives it, and the
    selector picks which: random rows there differ from the probe's, magnitude rows are each matrix's largest."""
    def selection(selector, allocation):
        cfg, tok, data, ds, collator, context = setup("tiny-encoder", "sparse", data_dir, [
            "method.budget=0.001", "method.probe_batches=2", "method.probe_head_steps=4", "method.depth=1",
            f"method.selector={selector}", f"method.allocation={allocation}"])
        method = get_method(cfg.method)
        model = method.prepare(load_model(cfg.backbone, len(data.labels), tok), context=context)
        return method.state["rows"], model
    from sparsetune_cli.errors import UserError
    token, _ = selection("token", "by_score")
    counts = {n: len(r) for n, r in token.items()}
    assert counts != {n: len(r) for n, r in selection("random", "by_score")[0].items()}   # a real constraint
    for selector in ("random", "magnitude"):
        rows, model = selection(selector, "probe")
        assert {n: len(r) for n, r in rows.items()} == counts
        assert rows != token
        if selector == "magnitude":
            for name, r in rows.items():
                norms = model.get_submodule(name).weight.detach().abs().sum(1)
                assert set(r) == set(torch.topk(norms, len(r)).indices.tolist())
    for bad in ("method.embeddings=true", "method.depth=auto"):
        cfg, *_ = setup("tiny-encoder", "sparse", data_dir, ["method.allocation=probe", bad])
        with pytest.raises(UserError, match="allocation=probe"):
            get_method(cfg.method).validate()


def test_weight_change_script_finds_the_blocks_each_method_changed(tmp_path, data_dir):
    """scripts/weight_change.py: sparse with depth 1 changes the top block alone (the merged export, against the
    pretrained weights), full finetuning every block and the embeddings."""
    runs = []
    for method, extra in (("sparse", ["method.depth=1", "method.lr=1e-2"]), ("full", [])):
        record, run_dir = run_tiny(tmp_path / method, [f"method={method}", "task=trec", f"data_dir={data_dir}", *extra])
        assert record["status"] == "completed"
        runs.append(str(run_dir))
    proc = subprocess.run([sys.executable, "scripts/weight_change.py", *runs], check=True, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| ")]
    header, sparse, full = rows[0], dict(zip(rows[0], rows[1])), dict(zip(rows[0], rows[2]))
    assert header == ["run", "embeddings", "block 0", "block 1"]
    assert float(sparse["embeddings"]) == float(sparse["block 0"]) == 0 < float(sparse["block 1"])
    assert all(float(full[column]) > 0 for column in header[1:])
