"""Data loading from the real bundle for every task, validation carving, and data errors."""
from __future__ import annotations

from collections import Counter

import pytest

from conftest import compose
from sparsetune_cli.data import carve_validation, load_task, longest_first, read_jsonl, tokenize
from sparsetune_cli.errors import UserError

EXPECTED = {  # task -> (number of train labels, input format)
    "intent": (150, "text"), "banking77": (77, "text"), "trec": (50, "text"), "srl": (43, "srl"),
    "entity_matching": (2, "pair"),
}


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_every_task_loads_from_the_bundle(task, data_dir):
    cfg = compose([f"task={task}", f"data_dir={data_dir}", "task.train_limit=300", "task.eval_limit=50"])
    data = load_task(cfg.task, cfg.data_dir)
    n_labels, fmt = EXPECTED[task]
    assert len(data.labels) == n_labels
    assert {len(data.splits[s]) for s in ("validation", "test")} == {50}
    assert len(data.splits["train"]) == 300
    row = data.splits["train"][0]
    assert row["text"].strip() and row["label"] in data.labels
    assert (row["text_pair"] is not None) == (fmt in ("pair", "srl"))


def test_intent_out_of_scope_option_adds_a_151st_label(data_dir):
    cfg = compose(["task=intent", f"data_dir={data_dir}", "task.include_oos=true"])
    assert len(load_task(cfg.task, cfg.data_dir).labels) == 151


def test_trec_coarse_labels(data_dir):
    cfg = compose(["task=trec", f"data_dir={data_dir}", "task.coarse=true"])
    assert load_task(cfg.task, cfg.data_dir).labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def test_srl_input_marks_predicate_and_argument(data_dir):
    cfg = compose(["task=srl", f"data_dir={data_dir}", "task.train_limit=50"])
    row = load_task(cfg.task, cfg.data_dir).splits["train"][0]
    assert "<<" in row["text"] and ">>" in row["text"] and "[[" in row["text"] and "]]" in row["text"]
    assert row["text_pair"].startswith("predicate: ")


def test_entity_matching_keeps_the_named_attributes_in_order(data_dir):
    whole = load_task(compose(["task=entity_matching", f"data_dir={data_dir}", "task.train_limit=50"]).task, data_dir)
    cfg = compose(["task=entity_matching", f"data_dir={data_dir}", "task.train_limit=50", "task.attributes=[price,name]"])
    kept = load_task(cfg.task, data_dir)
    for a, b in zip(whole.splits["train"], kept.splits["train"]):
        name = a["text"].split("; description:")[0].removeprefix("name: ")
        price = a["text"].rsplit("price:", 1)[1].strip()
        assert b["text"] == f"price: {price}".strip() + f"; name: {name}" and b["label"] == a["label"]
        assert "description" not in b["text_pair"] and b["text_pair"].startswith("price:")


def test_attributes_in_typed_inputs_too():
    from sparsetune_cli.formats import parse_input
    cfg = compose(["task=entity_matching", "task.attributes=[name]"])
    row = parse_input(cfg.task, "name: a b; description: long; price: 3\tname: c; description:; price:")
    assert row == {"text": "name: a b", "text_pair": "name: c"}
    with pytest.raises(UserError, match=r"input: the record has no attribute 'name' \(it has: none\)"):
        parse_input(cfg.task, "just text\tname: c")


@pytest.mark.parametrize("overrides,message", [
    (["task=entity_matching", "task.attributes=[name,colour]"],
     r"abt_buy/train\.jsonl:1: the record has no attribute 'colour' \(it has: name, description, price\)"),
    (["task=trec", "+task.attributes=[name]"], r"task\.attributes=\['name'\]: only a pair task's records"),
    (["task=entity_matching", "task.attributes=[]"], r"give a non-empty list"),
])
def test_bad_attributes_say_what_to_fix(data_dir, overrides, message):
    with pytest.raises(UserError, match=message):
        load_task(compose(overrides + [f"data_dir={data_dir}"]).task, data_dir)


def test_missing_validation_is_carved_stratified_and_deterministic(data_dir):
    cfg = compose(["task=banking77", f"data_dir={data_dir}"])
    a, b = load_task(cfg.task, cfg.data_dir), load_task(cfg.task, cfg.data_dir)
    assert [r["text"] for r in a.splits["validation"]] == [r["text"] for r in b.splits["validation"]]
    assert len(a.splits["validation"]) == pytest.approx(0.1 * 10003, abs=80)
    assert len(a.splits["train"]) + len(a.splits["validation"]) == 10003
    assert len({r["label"] for r in a.splits["validation"]}) == 77        # every class is represented
    assert len(a.splits["test"]) == 3080


def test_carving_keeps_singleton_classes_in_train():
    rows = [{"text": f"t{i}", "text_pair": None, "label": "a" if i < 30 else "b"} for i in range(60)]
    rows.append({"text": "lonely", "text_pair": None, "label": "c"})
    train, val = carve_validation(rows, 0.2, seed=0)
    assert Counter(r["label"] for r in val) == {"a": 6, "b": 6}
    assert any(r["label"] == "c" for r in train)


def test_truncation_is_counted(data_dir):
    from sparsetune_cli.models import load_tokenizer
    cfg = compose(["task=entity_matching", f"data_dir={data_dir}", "task.train_limit=200", "task.eval_limit=50",
                   "task.max_length=32"])
    data = load_task(cfg.task, cfg.data_dir)
    ds, truncated = tokenize(data, load_tokenizer(cfg.backbone), 32)
    assert truncated["train"] > 0 and max(len(x) for x in ds["train"]["input_ids"]) == 32


def test_tokenized_splits_are_cached_by_content_and_equal_fresh_ones(tmp_path, data_dir):
    import dataclasses
    from unittest import mock

    from sparsetune_cli.models import load_tokenizer
    cfg = compose(["task=entity_matching", f"data_dir={data_dir}", "task.train_limit=60", "task.eval_limit=20"])
    data, tokenizer = load_task(cfg.task, cfg.data_dir), load_tokenizer(cfg.backbone)
    fresh = tokenize(data, tokenizer, 32)

    def same(a, b):
        return a[1] == b[1] and all(a[0][s].to_dict() == b[0][s].to_dict() for s in data.splits)
    assert same(tokenize(data, tokenizer, 32, tmp_path), fresh)   # a miss: tokenizes and saves
    with mock.patch.object(type(tokenizer), "__call__", side_effect=AssertionError("tokenized again")):
        assert same(tokenize(data, tokenizer, 32, tmp_path), fresh)   # a hit: no tokenizer call
    # Anything the output depends on makes a new entry: max_length, a row, the labels.
    relabeled = dataclasses.replace(data, splits={**data.splits, "test": [
        {**r, "label": data.labels[0]} for r in data.splits["test"]]})
    assert relabeled.splits["test"] != data.splits["test"]
    assert same(tokenize(relabeled, tokenizer, 32, tmp_path), tokenize(relabeled, tokenizer, 32))
    assert same(tokenize(data, tokenizer, 64, tmp_path), tokenize(data, tokenizer, 64))
    assert len(list(tmp_path.iterdir())) == 3    # and no temporary folder is left behind


def test_evaluation_order_is_longest_first_and_keeps_each_row_whole(data_dir):
    from sparsetune_cli.models import load_tokenizer
    cfg = compose(["task=banking77", f"data_dir={data_dir}", "task.eval_limit=300"])
    ds, _ = tokenize(load_task(cfg.task, cfg.data_dir), load_tokenizer(cfg.backbone), cfg.task.max_length)
    sorted_ds = longest_first(ds["validation"])
    lengths = [len(x) for x in sorted_ds["input_ids"]]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    def rows(d):
        return sorted(zip(map(tuple, d["input_ids"]), d["labels"]))
    assert rows(sorted_ds) == rows(ds["validation"])


def test_missing_data_says_where_it_looked_and_how_to_fix(tmp_path):
    cfg = compose(["task=srl", f"data_dir={tmp_path}"])
    with pytest.raises(UserError, match=r"looked in .*srl.*data_dir="):
        load_task(cfg.task, cfg.data_dir)


def test_malformed_json_names_file_and_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "ok", "label": "a"}\n{"text": broken\n')
    with pytest.raises(UserError, match=r"train\.jsonl:2: malformed JSON"):
        read_jsonl(bad)
