"""The comparison table and the atomic result write."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sparsetune_cli.record import classification_metrics, collect, write_json_atomic
from sparsetune_cli.report import comparison_table, data_order_note, markdown


def record(method, task, seed, acc, status="completed"):
    return {"status": status, "task": task, "backbone": "minilm", "method": method, "seed": seed,
            "headline_metric": "accuracy", "metrics": {"test": {"accuracy": acc, "macro_f1": acc / 2}}}


def test_table_means_and_stds_over_seeds(tmp_path):
    recs = [record("sparse", "intent", s, a) for s, a in enumerate([0.90, 0.92, 0.94])]
    recs += [record("full", "intent", 0, 0.80), record("full", "trec", 0, 0.70)]
    recs.append(record("full", "trec", 1, 0.10, status="failed"))
    for i, r in enumerate(recs):
        write_json_atomic(tmp_path / f"r{i}" / "metrics.json", r)
    found = collect([tmp_path])
    assert len(found) == 5                          # the failed run is left out
    display, stats = comparison_table(found)
    row = stats[(stats.method == "sparse") & (stats.task == "intent")].iloc[0]
    assert row["mean"] == pytest.approx(0.92) and row["std"] == pytest.approx(0.02) and row["count"] == 3
    assert display.loc["sparse", "intent"].startswith("0.9200 ± 0.0200")
    assert display.loc["sparse", "trec"] == ""      # no sparse run on trec
    _, stats = comparison_table(found, metric="macro_f1")
    assert stats[(stats.method == "full") & (stats.task == "trec")]["mean"].iloc[0] == pytest.approx(0.35)


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"status": "completed"})

    class Boom:
        def __repr__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"status": "running", "bad": Boom()})
    assert json.loads(path.read_text()) == {"status": "completed"}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_metrics_count_unseen_labels_as_wrong_and_f1_of_positive_class():
    logits = np.eye(2)[[0, 1, 1, 0]]
    labels = np.array([0, 1, 0, -100])
    m = classification_metrics(logits, labels, positive=1)
    assert m["accuracy"] == 0.5
    assert m["f1"] == pytest.approx(2 / 3)         # precision 1/2, recall 1/1


def test_table_shows_counts_as_whole_numbers(tmp_path):
    recs = [dict(record(m, "intent", 0, 0.9), cost={"trainable_params": n}) for m, n in [("head_only", 0), ("sparse", 225408)]]
    for i, r in enumerate(recs):
        write_json_atomic(tmp_path / f"r{i}" / "metrics.json", r)
    display, _ = comparison_table(collect([tmp_path]), metric="cost.trainable_params")
    assert display.loc["head_only", "intent"] == "0 (n=1)" and display.loc["sparse", "intent"] == "225,408 (n=1)"


def test_markdown_gives_each_score_column_one_number_of_decimals():
    import pandas as pd
    table = pd.DataFrame({"lr": [0.0003, 0.01, 3e-5], "validation": [0.8, 0.850731, 0.9],
                          "evaluations": [12.0, 20.0, 7.0], "chosen": [False, True, False]})
    rows = markdown(table, index=False).splitlines()[2:]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[0] for c in cells] == ["0.0003", "0.01", "3e-05"]       # settings keep their shortest form
    assert [c[1] for c in cells] == ["0.8000", "0.8507", "0.9000"]    # not 0.8 beside 0.8507
    assert [c[2] for c in cells] == ["12", "20", "7"]
    table.loc[2, "validation"] = float("nan")
    assert markdown(table, index=False).splitlines()[4].split("|")[2].strip() == ""   # not "nan"
    indexed = markdown(table.set_index("lr"), index=True).splitlines()[2]   # the index column counts too
    assert [c.strip() for c in indexed.strip("|").split("|")][:2] == ["0.0003", "0.8000"]


def test_git_commit_is_dirty_for_changed_code_but_not_for_changed_records(tmp_path, monkeypatch):
    import subprocess

    from sparsetune_cli import record as results
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "results" / "metrics.json").write_text("{}")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    monkeypatch.setattr(results, "REPO_ROOT", tmp_path)
    clean = results.git_commit()
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "results" / "metrics.json").write_text('{"status": "completed"}')   # a sweep wrote a record
    assert results.git_commit() == clean
    (tmp_path / "code.py").write_text("a = 2\n")
    assert results.git_commit() == clean + "-dirty"


def study_frame(effects: dict, seeds=range(5), noise=None):
    """A selector-study frame: test = seed baseline + the selector's effect (+ optional per-run noise)."""
    import pandas as pd
    rows = []
    for seed in seeds:
        for sel, effect in effects.items():
            extra = 0.0 if noise is None else noise[(sel, seed)]
            rows.append({"task": "srl", "budget": 0.001, "depth": "2", "granularity": "rows", "selector": sel,
                         "seed": seed, "test": 0.5 + 0.05 * seed + effect + extra, "validation": 0.5 + effect})
    return pd.DataFrame(rows)


def test_selector_study_pairs_seeds_and_gives_a_95_interval():
    """The seed baseline (here 0.05 per seed, far larger than the effects) cancels in the paired difference."""
    from scipy import stats
    from sparsetune_cli.report import selector_study
    rng = np.random.default_rng(0)
    noise = {(s, i): float(rng.normal(0, 0.002)) for s in ("token", "random", "magnitude") for i in range(5)}
    df = study_frame({"token": 0.01, "random": 0.0, "magnitude": 0.012}, noise=noise)
    out = selector_study(df, ["srl"]).set_index("selector")
    d = np.array([0.01 + noise[("token", i)] - noise[("random", i)] for i in range(5)])
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
    assert out.loc["token", "vs random"] == f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}] (n=5)"
    assert d.mean() - half > 0            # beats random ...
    assert not out.loc["token", "beats both"]   # ... but not magnitude
    assert not out.loc["random", "beats both"] and not out.loc["magnitude", "beats both"]   # controls are not tested
    better = selector_study(study_frame({"token": 0.02, "random": 0.0, "magnitude": 0.005}, noise=noise), ["srl"])
    assert better.set_index("selector").loc["token", "beats both"]


def test_selector_verdict_follows_the_issues_rule():
    """A token-driven selector becomes the default only where it beats both controls on 3 tasks at one setting;
    otherwise the best mean validation over the balanced main cells wins, even a control."""
    import pandas as pd
    from sparsetune_cli.report import selector_study, selector_verdict
    rng = np.random.default_rng(1)

    def tasks(effects, names):
        noise = {(s, i): float(rng.normal(0, 0.002)) for s in effects for i in range(5)}
        return pd.concat([study_frame(effects, noise=noise).assign(task=t) for t in names])
    strong = {"token": 0.03, "token_fisher": 0.02, "random": 0.0, "magnitude": 0.0}
    three = selector_study(tasks(strong, ["srl", "trec", "intent"]), ["srl", "trec", "intent"])
    table, default, why = selector_verdict(three)
    assert default == "token" and why.startswith("token beats random and magnitude") and "on 3 tasks at 0.1%" in why
    two = selector_study(pd.concat([tasks(strong, ["srl", "trec"]),
                                    tasks({"token": -0.02, "token_fisher": -0.03, "random": 0.0, "magnitude": 0.01},
                                          ["intent"])]), ["srl", "trec", "intent"])
    table, default, why = selector_verdict(two)
    assert default == "token" and why.startswith("no token-driven selector") and "at most 2 tasks" in why
    assert table.set_index("selector").loc["token", "main cells"] == 3
    weak = {"token": 0.0, "token_fisher": 0.001, "random": 0.002, "magnitude": 0.03}
    table, default, why = selector_verdict(selector_study(tasks(weak, ["srl", "banking77", "trec"]),
                                                          ["srl", "banking77", "trec"]))
    assert default == "magnitude" and "on no task at all" in why
    # two selectors meet the rule: the better mean validation is the default, whichever was seen first
    for order in (["token", "token_fisher"], ["token_fisher", "token"]):
        both = {**{s: strong[s] for s in order}, "random": 0.0, "magnitude": 0.0}
        table, default, why = selector_verdict(selector_study(tasks(both, ["srl", "trec", "intent"]),
                                                              ["srl", "trec", "intent"]))
        assert default == "token" and why.endswith("; token_fisher at 0.1%, depth 2, rows too, with a lower mean "
                                                   "validation"), why
    # winners at two settings: the better mean validation at its own setting, over the tasks both ran (not the
    # main cells), and the setting is named
    at_depth1 = {"token+head64": 0.04, "random": 0.0, "magnitude": 0.0}
    depth1 = tasks(at_depth1, ["srl", "trec", "intent", "banking77"]).assign(depth="1", budget=0.01)
    depth1.loc[depth1.task == "banking77", "validation"] += 0.5   # a task the other setting did not run: ignored
    table, default, why = selector_verdict(selector_study(pd.concat([tasks(strong, ["srl", "trec", "intent"]),
                                                                     depth1]), ["srl", "trec", "intent", "banking77"]))
    assert default == "token+head64" and "on 4 tasks at 1%, depth 1, rows (mean validation 0.5400)" in why, why
    assert why.endswith("; token at 0.1%, depth 2, rows too; token_fisher at 0.1%, depth 2, rows too, with a lower "
                        "mean validation"), why
    # a variant run at one budget only is judged by the rule, not ranked on cells it did not run
    other_budget = pd.concat([tasks(strong, ["srl", "trec", "intent"]),
                              tasks(strong, ["srl", "trec", "intent"]).assign(budget=0.003),
                              tasks({"token+head64": 0.05}, ["srl"])])
    table, default, why = selector_verdict(selector_study(other_budget, ["srl", "trec", "intent"]))
    table = table.set_index("selector")
    assert table.loc["token+head64", "main cells"] == 0 and table.loc["token", "main cells"] == 6
    assert table.loc["token+head64", "beats both, 5+ seeds (task budget depth granularity)"] == "srl 0.1% 2 rows"
    # wins with fewer than 5 seeds are not counted yet
    few = selector_study(tasks(strong, ["srl", "trec", "intent"]).query("seed < 3"), ["srl", "trec", "intent"])
    assert few.set_index(["task", "selector"]).loc[("srl", "token"), "beats both"]
    why = selector_verdict(few)[2]
    assert why.startswith("no token-driven selector") and "on no task at all" in why
    # ... nor where the selector has 5 seeds but its controls 3: the pairs count
    uneven = tasks(strong, ["srl", "trec", "intent"]).query("seed < 3 or selector == 'token'")
    assert not selector_verdict(selector_study(uneven, ["srl", "trec", "intent"]))[2].startswith("token beats")
    # a selector with an extra seed (or one missing) in a cell is not ranked (its mean would not compare); the
    # others still are, on every cell
    extra = pd.concat([tasks(weak, ["srl", "trec"]), study_frame({"token": 0.5}, seeds=(5,))])
    table, default, why = selector_verdict(selector_study(extra, ["srl", "trec"]))
    table = table.set_index("selector")
    assert table.loc["token", "main cells"] == 0 and table.loc["random", "main cells"] == 2 and default == "magnitude"
    # no cell where the controls ran at as many seeds: nothing is ranked
    lagging = tasks(weak, ["srl"]).query("seed < 4 or selector != 'random'")
    table, default, why = selector_verdict(selector_study(lagging, ["srl"]))
    assert table["main cells"].max() == 0 and default == "" and why.startswith("no main cell")


def test_an_even_allocation_variant_is_paired_with_the_controls_of_its_allocation():
    from sparsetune_cli.report import selector_study
    df = study_frame({"token+even": 0.03, "random+even": 0.025, "magnitude+even": 0.02, "random": 0.0,
                      "magnitude": 0.0})
    row = selector_study(df, ["srl"]).set_index("selector").loc["token+even"]
    assert row["vs random"].startswith("+0.0050") and row["vs magnitude"].startswith("+0.0100")


def test_a_selector_is_compared_with_random_rows_in_the_matrices_its_probe_fills():
    from sparsetune_cli.report import selector_study
    df = study_frame({"token+head64": 0.03, "token": 0.01, "random+head64+probe": 0.025, "random": 0.0,
                      "magnitude": 0.0, "magnitude+head64+probe": 0.04})
    table = selector_study(df, ["srl"]).set_index("selector")
    assert table.loc["token+head64", "vs random, its matrices"].startswith("+0.0050")
    assert table.loc["token+head64", "vs magnitude, its matrices"].startswith("-0.0100")
    assert table.loc["token+head64", "vs random"].startswith("+0.0300")   # the issue's controls are unchanged
    assert table.loc["token", "vs random, its matrices"] == ""             # its own probe's control did not run


def test_stability_and_convergence_tables():
    import pandas as pd
    from sparsetune_cli.record import RunRecord
    from sparsetune_cli.report import convergence_table, stability_table
    df = pd.DataFrame([{"method": "full", "task": "trec", "seed": s, "test": v} for s, v in enumerate([0.9, 0.8, 0.85])])
    row = stability_table(df, ["trec"], ["sparse", "full"]).iloc[0]
    assert (row["seeds"], row["worst seed"], row["mean - worst"], row["best - worst"]) == (3, 0.8, 0.05, 0.1)

    def run(curve):
        return RunRecord.from_dict({"status": "completed", "task": "trec", "method": "full", "seed": 0,
                                    "headline_metric": "accuracy", "config": {"method": {"lr": 1e-4}},
                                    "history": [{"step": i, "accuracy": a} for i, a in enumerate(curve)]})
    conv = convergence_table([run([0.5, 0.8, 0.79]), run([0.5, 0.7, 0.703]), run([0.5, 0.6, 0.7])])
    assert conv["flattened"].tolist() == [True, True, False]   # best before the end; last two close; still rising
    assert conv["best at"].tolist() == [2, 3, 3]


def test_selector_plot_draws_the_tasks_that_have_random_runs(tmp_path):
    import pandas as pd
    from sparsetune_cli.report import selector_plot
    variants = {f"token+head{k}": 0.01 * k for k in range(12)}   # more lines than colors
    df = pd.concat([study_frame({"token": 0.02, "random": 0.0, "magnitude": 0.01, **variants}),
                    study_frame({"token": 0.03}).assign(task="trec")])   # trec has no random runs yet
    assert selector_plot(df, ["srl", "trec"], tmp_path) == tmp_path / "selector_study.png"
    assert (tmp_path / "selector_study.png").stat().st_size > 0
    assert selector_plot(df[df.task == "trec"], ["trec"], tmp_path / "none") is None


def test_a_budget_run_on_some_tasks_only_is_judged_but_not_ranked_on():
    """1% on srl alone (controls and the default only) leaves the others ranked over the budget every task ran."""
    import pandas as pd
    from sparsetune_cli.report import selector_study, selector_verdict
    both = pd.concat([study_frame({"token": 0.03, "token_fisher": 0.02, "random": 0.0, "magnitude": 0.0}).assign(task=t)
                      for t in ("srl", "trec")])
    one_pct = study_frame({"token+head64": 0.04, "random": 0.0, "magnitude": 0.0}).assign(budget=0.01)
    table = selector_verdict(selector_study(pd.concat([both, one_pct]), ["srl", "trec"]))[0].set_index("selector")
    assert table.loc["token", "main cells"] == 2 and table.loc["token_fisher", "main cells"] == 2
    assert table.loc["token+head64", "main cells"] == 0
    assert table.loc["token+head64", "beats both, 5+ seeds (task budget depth granularity)"] == "srl 1% 2 rows"
    # once the budget runs on every task, it is a main cell like the others
    everywhere = pd.concat([both, one_pct, one_pct.assign(task="trec")])
    table = selector_verdict(selector_study(everywhere, ["srl", "trec"]))[0].set_index("selector")
    assert table.loc["token", "main cells"] == 0 and table.loc["random", "main cells"] == 4


def test_a_sparse_run_is_labelled_by_what_changes_its_rows():
    """The probe's variants label probed selectors only (random ignores them), and a record from before an option
    existed reads as the option's default."""
    from sparsetune_cli.methods import METHODS
    describe = METHODS["sparse"].describe
    assert describe({"selector": "token", "probe_head_steps": 64, "budget": 0.001}) == {
        "selector": "token+head64", "budget": 0.001, "depth": "2", "granularity": "rows"}
    assert describe({"selector": "random", "probe_head_steps": 64, "probe_readout": True, "embeddings": True}
                    )["selector"] == "random"
    assert describe({"selector": "token", "probe_head_steps": 64, "embeddings": True})["selector"] == "token+head64+emb"
    assert describe({"selector": "magnitude", "allocation": "even"})["selector"] == "magnitude+even"
    assert describe({"selector": "token_fisher", "probe_readout": True, "depth": "all"}) == {
        "selector": "token_fisher+readout", "budget": 0.01, "depth": "all", "granularity": "rows"}
    assert METHODS["lora"].describe({"lr": 1e-4, "r": 8}) == {}


def test_the_ablation_table_has_a_depth_axis_only_where_the_ablation_varies_depth():
    import pandas as pd

    from sparsetune_cli.report import ablation_table
    rows = [{"task": "entity_matching", "selector": "token+head64", "budget": b, "depth": d, "seed": 0, "lr": 3e-4,
             "test": 0.6 + b + (0.1 if d == "all" else 0), "validation": 0.5 + b}
            for b in (0.01, 0.1) for d in ("2", "all")]
    both = ablation_table(pd.DataFrame(rows), ["entity_matching"])
    assert list(both.columns) == ["budget", "depth", "selector", "entity_matching", "entity_matching val"]
    assert len(both) == 4
    cell = both.set_index(["budget", "depth"]).loc[(0.1, "all")]
    assert cell["entity_matching"].startswith("0.8000") and cell["entity_matching val"] == "0.6000"
    pinned = ablation_table(pd.DataFrame([r for r in rows if r["depth"] == "2"]), ["entity_matching"])
    assert list(pinned.columns) == ["budget", "selector", "entity_matching", "entity_matching val"]
    assert len(pinned) == 2


def test_an_ablation_setting_run_at_a_second_lr_is_its_own_row_not_another_seed():
    import pandas as pd

    from sparsetune_cli.report import ablation_table
    rows = [{"task": t, "selector": "token+head64", "budget": 0.01, "depth": d, "seed": 0, "lr": lr,
             "test": test, "validation": test} for t, d, lr, test in
            [("trec", "2", 0.01, 0.9), ("trec", "all", 0.01, 0.88), ("trec", "all", 0.003, 0.9),
             ("intent", "2", 0.003, 0.95), ("intent", "all", 0.003, 0.95)]]
    table = ablation_table(pd.DataFrame(rows), ["trec", "intent"])
    assert list(table.columns)[:4] == ["budget", "depth", "selector", "lr"]
    cell = table.set_index(["depth", "lr"])["trec"]
    assert cell.loc[("all", 0.01)].startswith("0.8800 (n=1)") and cell.loc[("all", 0.003)].startswith("0.9000 (n=1)")
    same_lr = ablation_table(pd.DataFrame(rows[:2] + rows[3:]), ["trec", "intent"])   # each cell at one lr
    assert "lr" not in same_lr.columns


def test_the_stability_note_says_when_seeds_share_data_orders():
    from types import SimpleNamespace as Rec
    before_the_key, pinned, spread = (Rec(config={"train": t}) for t in
                                      ({}, {"data_order": "epoch_offset"}, {"data_order": "independent"}))
    assert "epoch_offset" in data_order_note([before_the_key]) and "epoch_offset" in data_order_note([spread, pinned])
    assert data_order_note([spread]) == ""
