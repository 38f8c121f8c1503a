"""Sweeps: idempotent multiruns, launchers, DDP on the CPU, and the paper pipeline on a tiny model."""
from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import TINY, compose, run_tiny
from sparsetune_cli.cli import pin_gpu, thread_share
from sparsetune_cli.config import CONFIG_DIR, non_result_keys
from sparsetune_cli.record import config_changes, cpu_model, usable_cpus
from sparsetune_cli.errors import UserError

BIN = Path(sys.executable).parent
TINY_JOB = ["backbone=tiny-encoder", "task=trec", "task.train_limit=64", "task.eval_limit=32", "train.max_steps=6",
            "train.batch_size=8", "train.progress=false"]


def sparsetune(*args, timeout=600, **kwargs):
    return subprocess.run([str(BIN / "sparsetune"), *args], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def records(root: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(root)): json.loads(p.read_text()) for p in root.rglob("metrics.json")}


def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path, data_dir):
    args = ["run", "-m", "method=head_only,bitfit,sparse,full", *TINY_JOB, f"output_root={tmp_path}",
            f"data_dir={data_dir}"]
    proc = subprocess.Popen([str(BIN / "sparsetune"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(r["status"] == "completed" for r in records(tmp_path).values()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)   # as a cluster preemption would
    proc.wait(timeout=120)
    finished = {k: (tmp_path / k / "metrics.json").stat().st_mtime_ns
                for k, r in records(tmp_path).items() if r["status"] == "completed"}
    assert 1 <= len(finished) < 4, "the sweep should have been stopped part way"

    again = sparsetune(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    final = records(tmp_path)
    assert len(final) == 4 and all(r["status"] == "completed" for r in final.values())
    for k, mtime in finished.items():   # finished runs were skipped, not redone
        assert (tmp_path / k / "metrics.json").stat().st_mtime_ns == mtime
    assert (again.stdout + again.stderr).count("already completed") == len(finished)


def test_completed_run_of_another_config_is_not_silently_reused(tmp_path, data_dir):
    from sparsetune_cli.train import run
    record, run_dir = run_tiny(tmp_path, ["method=head_only", f"data_dir={data_dir}"])
    same = compose(["backbone=tiny-encoder", f"output_root={tmp_path}", "method=head_only", f"data_dir={data_dir}",
                    "task.train_limit=200", "task.eval_limit=60", "train.epochs=1", "train.progress=true"])
    assert run(same, run_dir).weights_sha256 == record["weights_sha256"]   # progress bars change no result
    other = compose(["backbone=tiny-encoder", f"output_root={tmp_path}", "method=head_only", f"data_dir={data_dir}",
                     "task.train_limit=200", "task.eval_limit=60", "train.epochs=1", "method.lr=0.1"])
    with pytest.raises(UserError, match=r"different config \(method\.lr: 0\.01 -> 0\.1\); pass force=true"):
        run(other, run_dir)


def test_checkpoints_of_an_unfinished_run_resume_only_under_its_config(tmp_path, data_dir):
    # an experiment's YAML edited between a stop and the rerun names the same folder: its checkpoints were
    # trained under the old config, and resuming them would record a mixture as the new one
    from sparsetune_cli.train import run
    args = ["backbone=tiny-encoder", f"output_root={tmp_path}", "method=head_only", f"data_dir={data_dir}", *TINY,
            "train.keep_checkpoints=true"]
    _, run_dir = run_tiny(tmp_path, args[2:])
    record = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**record, "status": "interrupted"}))   # as a stop leaves it
    with pytest.raises(UserError, match=r"holds checkpoints of an interrupted run of a different config "
                                        r"\(train\.weight_decay: 0\.01 -> 0\.1\); pass force=true"):
        run(compose([*args, "train.weight_decay=0.1"]), run_dir)
    assert run(compose(args), run_dir).status == "completed"   # the same config resumes


def test_a_key_a_record_predates_counts_as_the_value_runs_had_before_it():
    from sparsetune_cli.config import ADDED_KEYS
    from sparsetune_cli.methods import METHODS
    new = OmegaConf.to_container(compose(["method=sparse", "train.patience=2", "method.probe_head_steps=64"]),
                                 resolve=True)
    old = json.loads(json.dumps(new))
    del old["train"]["patience"], old["method"]["probe_head_steps"], old["method"]["allocation"]
    added = {**ADDED_KEYS, **{f"method.{k}": v for k, v in METHODS["sparse"].option_defaults().items()}}
    # before probe_head_steps existed the probe ran through the random head (0), whatever sparse's default is
    assert config_changes(old, new, added=added) == [
        "method.probe_head_steps: 0 (the run predates the key) -> 64",
        "train.patience: None (the run predates the key) -> 2"]
    new["method"]["probe_head_steps"], new["train"]["patience"] = 0, None
    assert config_changes(old, new, added=added) == []
    new["train"]["brand_new"] = 1   # a key with no recorded earlier value: what the old run did is not known
    assert config_changes(old, new, added=added) == ["train.brand_new: not recorded (the run predates the key) -> 1"]


def test_every_committed_record_is_reused_under_todays_configs():
    # records under results/ stay valid through every change of config: `sparsetune paper` skips them
    from sparsetune_cli.methods import METHODS
    from sparsetune_cli.record import read_record, same_config
    root = Path(__file__).resolve().parent.parent
    composed, checked = {}, 0
    for path in sorted((root / "results" / "runs").glob("*/*/*/*/seed*/metrics.json")):
        r = read_record(path.parent)
        if r is None or r.status != "completed":
            continue
        keys = r.variant.split(",")
        experiment = [o for o in keys if o.startswith("experiment=")]
        folder_keys = [o for o in keys if not o.startswith("experiment=")]
        base = (*experiment, f"task={r.task}", f"method={r.method}", f"backbone={r.backbone}")
        if base not in composed:   # one composition per experiment and group choice; the folder's keys merged
            composed[base] = compose(list(base))
        cfg = OmegaConf.merge(composed[base], OmegaConf.from_dotlist([*folder_keys, f"seed={r.seed}"]))
        same_config(r, cfg, path.parent, "a completed run", METHODS[r.method].option_defaults)
        checked += 1
    assert checked > 700


def test_keys_that_do_not_change_results_stay_out_of_folder_names():
    hydra_cfg = OmegaConf.load(Path(CONFIG_DIR) / "config.yaml").hydra
    excluded = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    assert non_result_keys() == excluded - {"task", "backbone", "method", "seed"}   # one list, in config.yaml
    assert {"data_dir", "train.threads", "method.lr_grid"} <= non_result_keys()


def test_a_run_folder_name_too_long_for_the_file_system_ends_in_a_hash_of_the_whole():
    from sparsetune_cli.config import MAX_TAG, run_tag
    short = "method.lr=0.01,train.epochs=2"
    assert run_tag(short) == short                       # committed folder names stay as they were
    long_a = ",".join(f"+backbone.random_init.k{i}=1" for i in range(20))
    long_b = long_a.replace("k19=1", "k19=2")
    tag_a, tag_b = run_tag(long_a), run_tag(long_b)
    assert len(tag_a.encode()) <= MAX_TAG and tag_a.startswith(long_a[:100]) and tag_a != tag_b
    assert run_tag(long_a) == tag_a                      # the same config finds the same folder


def test_run_and_multirun_of_one_config_use_one_folder(tmp_path, data_dir):
    overrides = ["method=head_only", "method.lr=1e-2", "train.frozen_dropout=false", "task.coarse=true", *TINY_JOB,
                 f"output_root={tmp_path}", f"data_dir={data_dir}"]
    single = sparsetune("run", *overrides)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = sparsetune("run", "-m", *overrides)
    assert multi.returncode == 0, multi.stderr[-2000:]
    assert "already completed" in multi.stdout + multi.stderr
    [folder] = records(tmp_path)   # one folder, named as multirun spells the values
    assert folder.startswith("runs/trec/tiny-encoder/head_only/method.lr=0.01,task.coarse=True,")
    assert "train.frozen_dropout=False" in folder


def test_unknown_launcher_lists_the_installed_ones():
    proc = sparsetune("run", "hydra/launcher=nope", timeout=120)
    assert proc.returncode != 0
    for name in ("basic", "joblib", "submitit_slurm", "submitit_local", "parallel", "slurm"):
        assert f"\t{name}\n" in proc.stderr


@pytest.mark.parametrize("launcher", ["parallel", "submitit_local"])
def test_launchers_run_every_job(tmp_path, data_dir, launcher):
    threads = [] if launcher == "parallel" else ["train.threads=1"]   # parallel jobs get their share themselves
    proc = sparsetune("run", "-m", f"hydra/launcher={launcher}", *threads, "method=head_only,sparse",
                      *TINY_JOB, f"output_root={tmp_path}", f"data_dir={data_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = records(tmp_path / "runs")
    assert sorted(r["method"] for r in final.values()) == ["head_only", "sparse"]
    assert all(r["status"] == "completed" for r in final.values())
    if launcher == "parallel":   # 2 jobs (parallel.yaml) share the cores
        share = max(1, usable_cpus() // 2)
        assert [r["config"]["train"]["threads"] for r in final.values()] == [share, share]
        assert [r["cost"]["threads"] for r in final.values()] == [share, share]


@pytest.mark.parametrize("n_jobs, cpus, threads", [(2, 16, 8), (3, 16, 5), (-1, 16, 1), (-2, 16, 1), (-2, 4, 1),
                                                   (None, 16, 16), (32, 16, 1), (2, 1, 1)])
def test_parallel_jobs_share_the_cores(n_jobs, cpus, threads):
    assert thread_share(n_jobs, cpus) == threads


def test_the_cores_counted_are_the_ones_the_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)   # a pinned cluster job
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert usable_cpus() == 3
    monkeypatch.delattr(os, "sched_getaffinity")   # macOS: no affinity call, the machine's count
    assert usable_cpus() == 64


def test_the_cpu_model_is_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n")
    assert cpu_model(info) == "Intel(R) Xeon(R) Platinum 8480+"
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")      # no model line (some ARM kernels): platform's
    assert cpu_model(info) == (platform.processor() or platform.machine() or "unknown")
    assert cpu_model(tmp_path / "missing") == (platform.processor() or platform.machine() or "unknown")


def test_parallel_jobs_get_one_gpu_each(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    pin_gpu(3)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    pin_gpu(0)   # a worker already pinned keeps its GPU
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"


def test_ddp_with_two_cpu_processes_writes_one_result(tmp_path, data_dir):
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node=2", "--no-python", "sparsetune", "run",
                           "method=sparse", *[a for a in TINY_JOB if "max_steps" not in a], "train.epochs=1",
                           f"output_root={tmp_path}", f"data_dir={data_dir}"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = records(tmp_path).values()
    assert rec["status"] == "completed" and rec["cost"]["world_size"] == 2
    assert rec["cost"]["steps"] == 4   # 64 examples / (8 per process x 2 processes): the data is split
    assert len(list(tmp_path.rglob("trained.safetensors"))) == 1


def test_paper_refuses_overrides_that_change_the_runs():
    from sparsetune_cli.sweep import Plan
    with pytest.raises(UserError, match=r"'method\.lr=0\.1' would change the runs of experiment=paper_smoke"):
        Plan("paper_smoke", ["method.lr=0.1"])
    plan = Plan("paper_smoke", ["output_root=/tmp/x", "hydra/launcher=parallel"])
    assert (plan.tasks, plan.methods, plan.seeds) == (["trec", "intent"], ["sparse", "full", "head_only"], ["0", "1"])


def test_paper_stops_after_a_signal_even_when_the_child_exits_cleanly(monkeypatch):
    """A SIGTERM that lands while the child sweep is only skipping finished runs (so it exits 0) still stops
    `sparsetune paper` instead of going on to the next sweep."""
    import threading
    from sparsetune_cli import sweep
    child = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(2)"]
    real_popen = subprocess.Popen
    monkeypatch.setattr(sweep.subprocess, "Popen", lambda cmd: real_popen(child))
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    with pytest.raises(KeyboardInterrupt):
        sweep.launch(["experiment=paper_smoke"])
    assert signal.getsignal(signal.SIGTERM) == before   # our handler was removed again


class FakeGrid:
    """A paper Plan whose seed-0 runs are made up: validation score = score(lr); `launch` "runs" them."""
    tasks, methods, experiment, overrides = ["trec"], ["sparse"], "paper_smoke", []

    def __init__(self, score, lr_extend=2, fails=(), diverges=()):
        self.score, self.lr_extend, self.fails, self.runs, self.launched = score, lr_extend, fails, {}, []
        self.diverges = diverges

    def lr_grid(self, method):
        from sparsetune_cli.sweep import lr_grid
        return lr_grid(method)

    def records(self, task, method, extra=None, statuses=("completed",), grid=False):
        from sparsetune_cli.record import RunRecord
        recs = [RunRecord.from_dict({"status": "diverged", "task": task, "method": method, "seed": 0,
                                     "config": {"method": {"lr": lr}}, "headline_metric": "accuracy"})
                if lr in self.diverges else
                RunRecord.from_dict({"status": "completed", "task": task, "method": method, "seed": 0,
                                     "config": {"method": {"lr": lr}}, "headline_metric": "accuracy",
                                     "metrics": {"validation": {"accuracy": s}, "test": {"accuracy": s}}})
                for lr, s in self.runs.items()]
        return [r for r in recs if r.status in statuses]

    def launch(self, overrides):
        lrs = next(o for o in overrides if o.startswith("method.lr=")).split("=")[1]
        self.launched.append(lrs)
        self.runs.update({float(lr): self.score(float(lr)) for lr in lrs.split(",") if float(lr) not in self.fails})


@pytest.mark.parametrize("score, extend, launched, chosen", [
    # sparse's lr_grid is 1e-3..3e-2. Still rising at the top: two steps past it, then stop at --lr-extend
    (lambda lr: lr, 2, ["0.001,0.003,0.01,0.03", "0.1", "0.3"], 0.3),
    (lambda lr: lr, 0, ["0.001,0.003,0.01,0.03"], 0.03),
    (lambda lr: -abs(lr - 0.05), 2, ["0.001,0.003,0.01,0.03", "0.1"], 0.03),   # one step finds the peak
    (lambda lr: -lr, 2, ["0.001,0.003,0.01,0.03", "0.0003", "0.0001"], 0.0001),  # falling: widen downwards
    (lambda lr: 0.5 if lr < 0.02 else 0.1, 2, ["0.001,0.003,0.01,0.03"], 0.001),  # a tie at the end: stay
])
def test_paper_grid_widens_past_an_end_that_scores_best(monkeypatch, score, extend, launched, chosen):
    from sparsetune_cli import report, sweep
    plan = FakeGrid(score, extend)
    monkeypatch.setattr(sweep, "launch", plan.launch)
    sweep.run_grid(plan)
    assert plan.launched == launched
    choice, missing = sweep.lr_choices(plan)
    assert choice == {("trec", "sparse"): chosen} and missing == []
    table = report.lr_table(plan, choice)
    assert sorted(table.lr) == sorted(float(lr) for lrs in launched for lr in lrs.split(","))
    assert table[table.edge].lr.tolist() == [min(table.lr), max(table.lr)]


def test_paper_grid_stops_widening_when_the_run_fails_and_reports_the_cell(monkeypatch):
    from sparsetune_cli import sweep
    plan = FakeGrid(lambda lr: lr, fails={0.1})
    monkeypatch.setattr(sweep, "launch", plan.launch)
    sweep.run_grid(plan)
    assert plan.launched == ["0.001,0.003,0.01,0.03", "0.1"]   # tried once, not forever
    assert sweep.lr_choices(plan) == ({}, ["trec/sparse (lr 0.1 to run)"])
    plan.runs.pop(0.01)
    assert sweep.lr_choices(plan)[1] == ["trec/sparse (lr 0.01 to run)"]   # the method's own grid comes first


def test_a_diverged_grid_point_finishes_its_grid_as_the_worst_lr(monkeypatch):
    """A run whose loss became non-finite is a result for the grid (that lr is too high), not a gap that keeps
    the cell from ever choosing an lr."""
    from sparsetune_cli import report, sweep
    plan = FakeGrid(lambda lr: lr, diverges={0.03, 0.1})   # rising to the top end, which diverges
    monkeypatch.setattr(sweep, "launch", plan.launch)
    sweep.run_grid(plan)
    assert plan.launched == ["0.001,0.003,0.01,0.03"]   # no widening past a diverged end
    choice, missing = sweep.lr_choices(plan)
    assert choice == {("trec", "sparse"): 0.01} and missing == []
    table = report.lr_table(plan, choice).set_index("lr")
    assert math.isnan(table.validation[0.03]) and table.validation[0.01] == 0.01 and table.chosen[0.01]


def test_an_unfinished_grid_shows_its_widened_points_so_far():
    """A grid still widening (its top end won, the next step has not run) lists every point it ran, the widened
    one included, with the ends of what it searched so far, and chooses nothing yet."""
    from sparsetune_cli import report, sweep
    plan = FakeGrid(lambda lr: lr)
    plan.runs = {lr: lr for lr in (0.001, 0.003, 0.01, 0.03, 0.1)}   # 0.1 won too: 0.3 is next
    choice, missing = sweep.lr_choices(plan)
    assert choice == {} and missing == ["trec/sparse (lr 0.3 to run)"]
    table = report.lr_table(plan, choice)
    assert table.lr.tolist() == [0.001, 0.003, 0.01, 0.03, 0.1] and not table.chosen.any()
    assert table[table.edge].lr.tolist() == [0.001, 0.1]


def test_lr_step_walks_the_1_3_10_series():
    from sparsetune_cli.sweep import lr_step
    assert [lr_step(lr, True) for lr in (1e-4, 3e-4, 0.01, 0.03)] == [3e-4, 1e-3, 0.03, 0.1]
    assert [lr_step(lr, False) for lr in (1e-4, 3e-4, 0.01, 0.03)] == [3e-5, 1e-4, 3e-3, 0.01]


def test_cost_ratios_pair_only_runs_with_the_same_thread_setting(monkeypatch):
    from sparsetune_cli import report
    monkeypatch.setattr(report, "time_to_reach", lambda run, full: 1.0)
    # seed 1 of full ran under the parallel launcher (1 thread, slower); sparse's seed 1 ran alone
    runs = [("full", 0, "None", 100.0), ("full", 1, "1", 200.0),
            ("sparse", 0, "None", 50.0), ("sparse", 1, "None", 40.0)]
    df = pd.DataFrame([{"method": m, "task": "trec", "seed": s, "threads": t, "run_dir": f"{m}{s}",
                        "cost.train_seconds": sec, "cost.wall_seconds": sec + 10, "cost.trainable_params": 1,
                        "cost.trainable_params_without_head": 0, "cost.peak_memory_mb": 1.0, "cost.checkpoint_mb": 1.0}
                       for m, s, t, sec in runs])
    cost = report.cost_table(df, ["sparse", "full"]).set_index("method")
    assert cost.loc["sparse", "train time ÷ full"] == 0.5          # seed 0 only, not the mean of 0.5 and 0.2
    assert cost.loc["sparse", "runs paired with full"] == 1 and cost.loc["sparse", "runs"] == 2
    assert cost.loc["full", "runs paired with full"] == 2


@pytest.mark.slow
def test_paper_pipeline_end_to_end(tmp_path, data_dir):
    out = tmp_path / "paper"
    proc = sparsetune("paper", "--experiment", "paper_smoke", "--ablation", "paper_ablation_smoke",
                      "--out", str(out), f"output_root={tmp_path}", f"data_dir={data_dir}", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("main.md", "main.csv", "lr_grid.csv", "cost.csv", "ablation.csv", "tokens.md",
                 "metric_vs_params.png", "metric_vs_time.png", "seed_spread.png"):
        assert (out / name).stat().st_size > 0, name

    from sparsetune_cli.sweep import lr_grid
    grid = pd.read_csv(out / "lr_grid.csv")
    for (task, method), cell in grid.groupby(["task", "method"]):
        assert set(lr_grid(method)) <= set(cell.lr), (task, method)   # the grid, widened past a best end
        chosen = cell[cell.chosen]
        assert len(chosen) == 1 and chosen.validation.iloc[0] == cell.validation.max(), (task, method)
        # every seed of the main table ran at the chosen lr
        runs = [r for r in records(tmp_path / "runs").values()
                if (r["task"], r["method"]) == (task, method) and r["variant"].startswith("experiment=paper_smoke,")
                and r["config"]["method"]["lr"] == chosen.lr.iloc[0]]
        assert sorted(r["seed"] for r in runs) == [0, 1]
    main = pd.read_csv(out / "main.csv", index_col=0)
    assert list(main.columns) == ["trec", "intent", "average"] and "(n=2)" in main.loc["sparse", "trec"]
    cost = pd.read_csv(out / "cost.csv").set_index("method")
    assert cost.loc["full", "train time ÷ full"] == 1.0
    assert cost.loc["sparse", "trainable params"] < cost.loc["full", "trainable params"]
    assert "how many" in (out / "tokens.md").read_text()   # trec's NUM:count cue
    assert len(pd.read_csv(out / "ablation.csv")) == 4      # 2 selectors x 2 budgets


def test_a_finished_run_is_skipped_without_importing_torch(tmp_path, data_dir):
    """A restarted sweep checks each finished run (config, data fingerprint) in a fraction of a second."""
    args = ["run", "method=head_only", *TINY_JOB, f"output_root={tmp_path}",
            f"data_dir={data_dir}"]
    assert sparsetune(*args).returncode == 0
    code = ("import sys\nfrom sparsetune_cli.cli import main\nmain(sys.argv[1:])\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch')")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "already completed" in proc.stderr + proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "no torch"


@pytest.mark.slow
def test_two_workers_of_paper_full_share_a_grid_and_finish_it(tmp_path, data_dir):
    """scripts/paper_full.sh (make paper-full) on the smoke grid: two workers in opposite task orders, kept off each
    other's runs by the run folders' locks, leave every cell finished once and write the tables."""
    out = tmp_path / "tables"
    env = {**os.environ, "BIN": str(BIN), "EXPERIMENT": "paper_smoke", "TASKS": "trec,intent", "CORE": "sparse,full",
           "OUT": str(out), "OUTPUT_ROOT": str(tmp_path), "WORKERS": "2", "SPARSETUNE_DATA_DIR": str(data_dir)}
    proc = subprocess.run(["bash", str(Path(__file__).parents[1] / "scripts" / "paper_full.sh")], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = records(tmp_path / "runs")
    assert runs and all(r["status"] == "completed" for r in runs.values())
    grid = pd.read_csv(out / "lr_grid.csv")
    for (task, method), cell in grid.groupby(["task", "method"]):
        lr = cell[cell.chosen].lr.iloc[0]
        seeds = sorted(r["seed"] for r in runs.values() if (r["task"], r["method"]) == (task, method)
                       and r["config"]["method"]["lr"] == lr)
        assert seeds == [0, 1], (task, method, seeds)
    main = pd.read_csv(out / "main.csv", index_col=0)
    assert set(main.index) == {"sparse", "full", "head_only"} and "(n=2)" in main.loc["head_only", "intent"]


def test_stopping_the_worker_launcher_sends_each_run_one_signal(tmp_path):
    """scripts/workers.sh forwards a stop to its workers once. Its trap used to re-enter on its own `kill 0` and
    send each run thousands of SIGTERMs; a run's second signal means "stop at once", so a run saving its
    checkpoint was recorded as failed (RecursionError) instead of interrupted."""
    child = tmp_path / "child.py"
    child.write_text("import signal, sys, time\n"
                     "got = []\n"
                     "signal.signal(signal.SIGTERM, lambda *_: got.append(1))\n"
                     "open(sys.argv[1] + '.ready', 'w').close()\n"
                     "while not got:\n    time.sleep(0.01)\n"
                     "time.sleep(1.0)   # time for any further signals to arrive\n"
                     "open(sys.argv[1], 'w').write(str(len(got)))\n")
    script = tmp_path / "launch.sh"
    script.write_text(f"WORKERS=2\nTASKS=a,b\nsource {Path(__file__).parents[1] / 'scripts' / 'workers.sh'}\n"
                      f"worker() {{ {sys.executable} {child} {tmp_path}/count$1; }}\nrun_workers\n")
    proc = subprocess.Popen(["bash", str(script)], start_new_session=True)   # kill 0 stays in its own group
    deadline = time.time() + 30
    while not all((tmp_path / f"count{i}.ready").exists() for i in (0, 1)) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    time.sleep(1.5)
    assert [(tmp_path / f"count{i}").read_text() for i in (0, 1)] == ["1", "1"]


def write_trec_record(plan, method, lr, seed, status, seconds=None, steps=None, score=0.5, extra=""):
    """A made-up run record of `plan` on trec in the folder the grid names (`extra`: more overrides after the lr),
    with its config.yaml, as a run writes when it starts."""
    from sparsetune_cli.record import RunRecord
    run_dir = plan.runs / "trec" / plan.backbone / method / f"experiment={plan.experiment},method.lr={lr}{extra}" / \
        f"seed{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("{}")
    RunRecord.from_dict({"status": status, "task": "trec", "method": method, "seed": seed,
                         "headline_metric": "accuracy", "config": {"method": {"lr": lr}},
                         "cost": {"train_seconds": seconds, "steps": steps} if seconds is not None else None,
                         "metrics": {"validation": {"accuracy": score}, "test": {"accuracy": score}}
                         if status == "completed" else None}).write(run_dir)
    return run_dir


def test_a_trial_run_of_the_experiment_with_more_overrides_is_not_a_grid_point(tmp_path):
    """`sparsetune run experiment=paper_smoke method.lr=0.01 train.max_steps=1` lands beside the grid's runs (the
    experiment names their folder); its score must not choose the lr, nor its seed join the main table."""
    from sparsetune_cli import sweep
    plan = sweep.Plan("paper_smoke", [f"output_root={tmp_path}"])
    plan.tasks, plan.methods = ["trec"], ["sparse"]
    for lr, score in ((0.001, 0.5), (0.003, 0.7), (0.01, 0.6), (0.03, 0.4)):
        write_trec_record(plan, "sparse", lr, 0, "completed", score=score)
    write_trec_record(plan, "sparse", 0.003, 1, "completed", score=0.65)
    write_trec_record(plan, "sparse", 0.01, 0, "completed", score=0.99, extra=",train.max_steps=1")  # would win
    write_trec_record(plan, "sparse", 0.003, 1, "completed", score=0.99, extra=",train.max_steps=1")  # a 2nd seed 1
    (plan.runs / "trec" / plan.backbone / "sparse" / "experiment=paper_smoke,method.lr=0.01,train.epochs=1" /
     "seed0").mkdir(parents=True)   # a trial still running

    assert sweep.lr_choices(plan) == ({("trec", "sparse"): 0.003}, [])
    assert sorted((r.seed, r.headline()) for r in sweep.main_records(plan)) == [(0, 0.7), (1, 0.65)]
    row = sweep.progress(plan)[0]
    assert row["grid"] == "4 done" and row["seeds done"] == "2/2" and row["started"] == ""
    assert sweep.Plan("paper_full_cpu_budget", []).grid_keys == {"experiment", "method.lr", "method.budget",
                                                                  "method.depth"}


def test_paper_takes_several_ablations_and_runs_and_tabulates_each(monkeypatch, tmp_path):
    from sparsetune_cli import cli, report, sweep
    ran, tabulated = [], []
    monkeypatch.setattr(sweep, "run_ablation", lambda plan, ablation: ran.append(ablation.experiment))
    monkeypatch.setattr(report, "write_tables", lambda plan, ablations, out, study: tabulated.extend(ablations) or [])
    cli.main(["paper", "--experiment", "paper_smoke", "--ablation", "paper_ablation_smoke,paper_full_cpu_budget",
              "--study", "none", "--stage", "ablation"])
    assert ran == ["paper_ablation_smoke", "paper_full_cpu_budget"] and tabulated == []
    cli.main(["paper", "--experiment", "paper_smoke", "--ablation", "paper_ablation_smoke,paper_full_cpu_budget",
              "--study", "none", "--stage", "tables", "--out", str(tmp_path)])
    assert [p.experiment for p in tabulated] == ["paper_ablation_smoke", "paper_full_cpu_budget"]
    assert len(ran) == 2


def test_an_ablation_runs_at_its_pinned_lr_where_it_has_one(monkeypatch):
    """ablation_lr keeps the selector study at the lr its runs began with when the main grid later chooses
    another; a task without one takes the main grid's choice, and none at all is a clear error."""
    from sparsetune_cli import sweep
    launched = []
    monkeypatch.setattr(sweep, "launch", launched.append)
    monkeypatch.setattr(sweep, "lr_choices", lambda plan, methods=None: (
        {("intent", "sparse"): 0.03, ("banking77", "sparse"): 0.03}, []))
    ablation = sweep.Plan("paper_ablation_cpu", [])
    assert sweep.Plan("paper_selector_depth1_cpu", []).ablation_lr == ablation.ablation_lr
    assert ablation.ablation_lr["intent"] == 0.01 and ablation.tasks == ["intent", "banking77"]
    del ablation.ablation_lr["banking77"]
    sweep.run_ablation(None, ablation)
    assert [o for cmd in launched for o in cmd if o.startswith("method.lr=")] == ["method.lr=0.01", "method.lr=0.03"]
    monkeypatch.setattr(sweep, "lr_choices", lambda plan, methods=None: ({}, []))
    with pytest.raises(UserError, match="sparse has no chosen lr for banking77"):
        sweep.run_ablation(sweep.Plan("paper_cpu", []), ablation)


def test_paper_status_counts_what_is_done_started_and_left_without_touching_a_run(tmp_path):
    """`sparsetune paper --stage status`: a grid that is done has its lr and seeds counted, a run cut off is shown
    at its newest checkpoint's step, and the hours to go come from the cell's finished runs less that progress."""
    from sparsetune_cli import sweep
    from sparsetune_cli.cli import status_text
    plan = sweep.Plan("paper_smoke", [f"output_root={tmp_path}"])
    plan.tasks, plan.methods = ["trec"], ["sparse", "full"]
    for lr, score in ((0.001, 0.5), (0.003, 0.7), (0.01, 0.6), (0.03, 0.4)):
        write_trec_record(plan, "sparse", lr, 0, "completed", 3600.0, 100, score)
    cut_off = write_trec_record(plan, "full", 0.0001, 0, "interrupted", 1800.0, 40)
    (cut_off / "checkpoints" / "checkpoint-40").mkdir(parents=True)
    (cut_off / "checkpoints" / "checkpoint-40" / "partial").write_text("a checkpoint being written")

    rows = {r["method"]: r for r in sweep.progress(plan)}
    assert rows["sparse"] == {"task": "trec", "method": "sparse", "grid": "4 done", "lr": "0.003",
                              "seeds done": "1/2", "started": "", "runs to go": 1, "hours spent": 4.0,
                              "hours to go": 1.0}
    full = rows["full"]
    assert full["grid"] == "lr 0.0001, 0.0003, 0.001, 0.003 to run" and full["lr"] == ""
    assert full["started"] == "method.lr=0.0001 seed0 at step 40" and full["runs to go"] == 5
    assert full["hours spent"] == 0.5 and full["hours to go"] is None   # no finished run to estimate from
    assert (cut_off / "checkpoints" / "checkpoint-40" / "partial").exists()   # left as it was

    write_trec_record(plan, "full", 0.0003, 0, "completed", 7200.0, 100)   # 72 s a step: cut_off has 60 to go
    full = {r["method"]: r for r in sweep.progress(plan)}["full"]
    assert full["runs to go"] == 4 and full["hours to go"] == round((4 * 7200 - 40 * 72) / 3600, 2)
    text = status_text(sweep.progress(plan), plan.experiment)
    assert text.startswith("experiment=paper_smoke: 5 runs to go (at least), 6.5 training hours spent, about 8.2 to "
                           "go in the 2 cells with a finished run (0 cells have none to estimate from)")
    proc = sparsetune("paper", "--experiment", "paper_smoke", "--stage", "status", f"output_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "method.lr=0.0001 seed0 at step 40" in proc.stdout and "| intent " in proc.stdout
