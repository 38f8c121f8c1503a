"""Every method on a tiny encoder and a tiny decoder: only the intended parameters change, and
save -> reload gives the same predictions."""
from __future__ import annotations

import pytest
import torch

from conftest import compose
from sparsetune_cli.data import load_task, tokenize
from sparsetune_cli.methods import METHODS, get_method
from sparsetune_cli.methods.sparse import Sparse
from sparsetune_cli.models import is_head, load_model, load_tokenizer
from sparsetune_cli.train import method_context

BACKBONES = ["tiny-encoder", "tiny-decoder"]


def setup(backbone, method, data_dir, extra=()):
    cfg = compose([f"backbone={backbone}", f"method={method}", "task=banking77", f"data_dir={data_dir}",
                   "task.train_limit=160", "task.eval_limit=16", "train.batch_size=16", *extra])
    tok = load_tokenizer(cfg.backbone)
    data = load_task(cfg.task, cfg.data_dir)
    ds, _ = tokenize(data, tok, cfg.task.max_length)
    context = method_context(cfg, data, ds, tok)
    return cfg, tok, data, ds, context.collator, context


def train_steps(model, ds, collator, lr, steps=4):
    """AdamW with weight decay over what the method left trainable (what the Trainer does)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    model.train()
    for i in range(steps):
        batch = collator([ds[j] for j in range(i * 16, i * 16 + 16)])
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def base_name(name: str) -> str:
    """Parameter name in the plain backbone (peft prefixes removed)."""
    for prefix in ("base_model.model.",):
        name = name.removeprefix(prefix)
    return name.replace(".base_layer", "").replace(".original_module", "")


SUBSET = {  # for methods that change base weights: which ones they may change (besides the head)
    "bitfit": lambda n, state: n.endswith(".bias") or "norm" in n,   # norms only where there is no bias
    "layer_select": lambda n, state: any(f"layers.{b}." in n or f"layer.{b}." in n for b in state["blocks"]),
}


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method_name", sorted(METHODS))
def test_method_trains_only_what_it_should_and_reloads(backbone, method_name, data_dir, tmp_path):
    cfg, tok, data, ds, collator, context = setup(backbone, method_name, data_dir)
    base = load_model(cfg.backbone, len(data.labels), tok, seed=0)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    method = get_method(cfg.method)
    model = method.prepare(base, context=context)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and any(is_head(n) for n in trainable), "the head always trains"
    train_steps(model, ds["train"], collator, lr=1e-2)

    changed = set()
    for n, p in model.named_parameters():
        plain = base_name(n)
        if plain in before and not torch.equal(p.detach(), before[plain]):
            changed.add(plain)
    state = method.state
    backbone_changed = [n for n in changed if not is_head(n)]
    if method.changes_base_weights:   # the method's trait, from the registry
        assert backbone_changed, "the backbone part did not train"
        allowed = SUBSET.get(method_name, lambda n, state: True)
        assert all(allowed(n, state) for n in backbone_changed), f"{method_name} changed frozen weights"
    else:   # adapters, prefixes, deltas are new tensors: base weights stay put
        assert not backbone_changed, f"{method_name} changed {backbone_changed[:3]}"

    model.eval()
    probe = collator([ds["test"][i] for i in range(8)])
    with torch.no_grad():
        expected = model(**probe).logits
    method.save(model, tmp_path)
    fresh = load_model(cfg.backbone, len(data.labels), tok, seed=123)     # different head init on purpose
    reloaded = get_method(cfg.method).load(fresh, tmp_path).eval()
    with torch.no_grad():
        got = reloaded(**probe).logits
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("method_name", sorted(m for m, cls in METHODS.items() if cls.mergeable and m != "sparse"))
def test_export_gives_a_plain_model_with_the_same_logits(method_name, data_dir):
    cfg, tok, data, ds, collator, context = setup("tiny-encoder", method_name, data_dir)
    method = get_method(cfg.method)
    model = method.prepare(load_model(cfg.backbone, len(data.labels), tok), context=context)
    train_steps(model, ds["train"], collator, lr=1e-2, steps=2)
    model.eval()
    batch = collator([ds["test"][i] for i in range(4)])
    with torch.no_grad():
        expected = model(**batch).logits
        plain = method.export(model)
        base = load_model(cfg.backbone, len(data.labels), tok)
        assert type(plain) is type(base) and plain.state_dict().keys() == base.state_dict().keys()
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_prefix_export_says_why_it_cannot_merge(data_dir):
    from sparsetune_cli.errors import UserError
    cfg, tok, data, ds, collator, context = setup("tiny-encoder", "prefix", data_dir)
    method = get_method(cfg.method)
    model = method.prepare(load_model(cfg.backbone, len(data.labels), tok), context=context)
    with pytest.raises(UserError, match="cannot be merged"):
        method.export(model)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method_name,extra,bottom_blocks", [
    ("sparse", ["method.depth=1"], 1), ("layer_select", ["method.num_blocks=1"], 1), ("head_only", [], 2),
    ("lora", [], 0), ("full", [], None), ("bitfit", [], None), ("prefix", [], None)])
def test_frozen_bottom_is_what_lies_below_the_lowest_trainable_block(backbone, method_name, extra, bottom_blocks,
                                                                     data_dir):
    from sparsetune_cli.models import frozen_bottom, transformer_blocks
    cfg, tok, data, ds, collator, context = setup(backbone, method_name, data_dir, extra)
    model = get_method(cfg.method).prepare(load_model(cfg.backbone, len(data.labels), tok), context=context)
    names = [n for n, _ in frozen_bottom(model)]
    if bottom_blocks is None:   # trainable embeddings or a prefix feed every block: nothing is fixed
        assert names == []
        return
    blocks = [n for n, _ in transformer_blocks(model)]
    assert len(names) == 1 + bottom_blocks and names[1:] == blocks[:bottom_blocks]   # the embeddings, then blocks
    assert names[0].endswith("embeddings" if backbone == "tiny-encoder" else "embed_tokens")


def test_frozen_dropout_false_makes_the_frozen_bottom_deterministic_while_the_top_keeps_dropout(data_dir):
    from sparsetune_cli.models import transformer_blocks
    from sparsetune_cli.train import prepare_model
    outputs = {}
    for frozen_dropout in (True, False):
        cfg, tok, data, ds, collator, context = setup("tiny-encoder", "sparse", data_dir,
                                                      ["method.depth=1", f"train.frozen_dropout={frozen_dropout}"])
        model = prepare_model(cfg, get_method(cfg.method), load_model(cfg.backbone, len(data.labels), tok), context)
        (_, low), (_, top) = transformer_blocks(model)
        seen = []
        low.register_forward_hook(lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
        batch = collator([ds["train"][j] for j in range(8)])
        logits = []
        for _ in range(2):
            model.train()   # as the Trainer does before every step
            logits.append(model(**batch).logits)
        outputs[frozen_dropout] = (torch.equal(*seen), torch.equal(*logits), top.training, low.training)
    assert outputs[True] == (False, False, True, True)      # dropout everywhere, as in Hugging Face training
    assert outputs[False] == (True, False, True, False)     # fixed bottom; the trainable top still drops out


def test_frozen_dropout_defaults_to_the_methods_own_setting_and_the_train_override_wins():
    defaults = {name: compose([f"method={name}"]).train.frozen_dropout for name in METHODS}
    assert defaults == {name: name not in ("sparse", "sparse_all") for name in METHODS}   # only sparse's set false
    assert compose(["method=sparse", "train.frozen_dropout=true"]).train.frozen_dropout is True
    assert compose(["method=sparse", "method.frozen_dropout=true"]).train.frozen_dropout is True
    assert compose(["method=head_only", "train.frozen_dropout=false"]).train.frozen_dropout is False


def test_a_saved_config_from_before_an_option_existed_gets_the_options_old_behavior():
    """Each method's Options default is what a run did before the key existed (the shipped YAML may differ)."""
    from omegaconf import OmegaConf
    for name, cls in METHODS.items():
        shipped = compose([f"method={name}"]).method
        defaults = OmegaConf.to_container(OmegaConf.structured(cls.Options))
        assert set(defaults) <= set(shipped), name   # every option is in the YAML, with a comment
        old = OmegaConf.create({k: v for k, v in OmegaConf.to_container(shipped).items() if k not in defaults})
        OmegaConf.set_struct(old, True)
        method = get_method(old)
        assert {k: method.cfg[k] for k in defaults} == defaults, name


@pytest.mark.parametrize("backbone", BACKBONES)
def test_the_frozen_bottom_trait_matches_what_the_method_leaves_frozen(backbone, data_dir):
    from sparsetune_cli.models import frozen_bottom, transformer_blocks
    for name, cls in METHODS.items():
        cfg, tok, data, ds, collator, context = setup(backbone, name, data_dir, ["method.probe_batches=1"]
                                                      if issubclass(cls, Sparse) else [])
        model = get_method(cfg.method).prepare(load_model(cfg.backbone, len(data.labels), tok), context=context)
        blocks = {n for n, _ in transformer_blocks(model)}
        bottom = [n for n, _ in frozen_bottom(model)]
        if cls.frozen_bottom:   # the embeddings at least, and every block below the lowest that trains
            assert bottom, name
        else:                   # no whole block stays fixed (LoRA leaves only the embeddings)
            assert not any(n in blocks for n in bottom), name


def test_a_method_defined_in_one_file_runs_through_train(tmp_path, data_dir):
    """A new method is a registered class (and a YAML): nothing else in the package lists methods."""
    from conftest import run_tiny
    from sparsetune_cli.methods import Method, register
    from sparsetune_cli.methods.base import freeze_all_but

    @register
    class TopBiases(Method):
        name = "toy_top_biases"
        changes_base_weights = True

        def prepare(self, model, context=None, state=None):
            freeze_all_but(model, lambda n: n.endswith(".bias") and ".layer.1." in n)
            return model
    try:
        record, run_dir = run_tiny(tmp_path, ["method=head_only", "method.name=toy_top_biases",
                                              f"data_dir={data_dir}", "train.max_steps=3"])
        assert record["status"] == "completed" and record["method"] == "toy_top_biases"
        assert 0 < record["cost"]["trainable_params_without_head"] < 1000   # the top block's biases only
        from sparsetune_cli.predict import load_run, predict
        assert predict(load_run(run_dir), ["how do I top up"]).shape[0] == 1
    finally:
        METHODS.pop("toy_top_biases")
