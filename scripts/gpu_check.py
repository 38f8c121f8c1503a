"""The paths only a GPU takes, run for real and written to results/gpu_check.md (`make gpu-check`).

Cases (each a real `sparsetune run` in its own process, on real data):
  bf16/<method>        every method, ~30 steps under bf16 autocast (what train.precision=auto picks on a
                       bf16-capable GPU); peak memory is torch.cuda.max_memory_allocated of that process;
                       bf16/sparse trains from the frozen-bottom cache (MiniLM: 4 of 6 blocks cached)
  fp16/sparse, fp16/full   fp16 autocast with the GradScaler
  smollm2/sparse       the Llama-family decoder on train.device=cuda; smollm2/sparse-bf16-backbone with
                       backbone.dtype=bf16 (frozen weights bf16, deltas fp32)
  sweep/parallel       a 2-job multirun under hydra/launcher=parallel (one GPU per job when there are several)
  determinism          sparse twice with train.deterministic=true (must repeat bit for bit) and twice without
                       (reported: whether it repeats)
  bench                scripts/bench.py on the GPU in bf16 (20 timed steps, no memory children): step-time ratios to
                       full, the frozen-bottom cache's variants, merged inference

Without CUDA it prints "no CUDA device: nothing checked" and exits 0 without writing a report (never a
pass). --allow-cpu runs the same cases on the CPU (fp16 cases skipped): how the tests check this script.

    python scripts/gpu_check.py
    # on a machine with no network and no venv, from the bundle that `make gpu-bundle` writes (README, "GPUs
    # and mixed precision"): it installs the bundle's wheels and runs this script on the bundle's models and data
    bash scripts/gpu_offline.sh check OUT_DIR
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["full", "sparse", "sparse_all", "lora", "layer_select", "prefix", "bitfit", "head_only"]


def run_cmd(argv: list[str], log: Path, timeout: int, env: dict | None = None) -> tuple[int, float]:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    with open(log, "w") as f:
        try:
            rc = subprocess.run(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("metrics.json"))]


def finite_completed(rec: dict) -> bool:
    test = (rec.get("metrics") or {}).get("test") or {}
    return rec.get("status") == "completed" and bool(test) and all(math.isfinite(v) for v in test.values())


class Check:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.device = "cuda" if not args.allow_cpu else "cpu"
        self.results: dict[str, dict] = {}

    def sparsetune(self, case: str, overrides: list[str], multirun: bool = False) -> tuple[int, float, list[dict]]:
        root = self.work / case.replace("/", "_")
        root.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "sparsetune_cli.cli", "run", *(["-m"] if multirun else []),
                f"output_root={root}", "train.progress=false", "train.logging_steps=10", *self.common, *overrides]
        rc, seconds = run_cmd(argv, root / "log.txt", self.args.timeout)
        return rc, seconds, records(root)

    @property
    def common(self) -> list[str]:
        a = self.args
        data = [f"data_dir={a.data_dir}"] if a.data_dir else []
        return [f"train.device={self.device}", f"train.max_steps={a.steps}", "task=intent",
                f"task.train_limit={max(a.steps * 32, 300)}", "task.eval_limit=500", *data]

    def backbone(self, which: str) -> tuple[list[str], str]:
        """Overrides for MiniLM or SmolLM2, from the installed package or a folder given on the command line."""
        a = self.args
        if which == "minilm":
            if a.backbone != "minilm":
                return [f"backbone={a.backbone}"], a.backbone
            if a.minilm:
                return ["backbone=minilm", "backbone.package=null", f"backbone.hub_id={Path(a.minilm).resolve()}"], \
                    f"MiniLM from {a.minilm}"
            return ["backbone=minilm"], "MiniLM (package)"
        if a.backbone != "minilm":
            return ["backbone=tiny-decoder"], "tiny-decoder"
        folder = Path(a.smollm).resolve() if a.smollm else None
        if folder is None:
            return ["backbone=smollm2-135m"], "SmolLM2-135M (package GGUF)"
        base = ["backbone=smollm2-135m", "backbone.package=null", "backbone.gguf_file=null",
                f"backbone.hub_id={folder}"]
        if any(folder.glob("*.safetensors")):
            return base, f"SmolLM2-135M from {a.smollm}"
        # Only the tokenizer and config travel (the weights exceed what fits): the same architecture, random weights.
        c = json.loads((folder / "config.json").read_text())
        spec = ",".join(f"{k}:{c[k]}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "num_key_value_heads", "intermediate_size"))
        return base + [f"+backbone.random_init={{model_type:llama,{spec}}}"], "SmolLM2-135M architecture, random weights"

    # ------------------------------------------------------------------ cases
    def case_run(self, case: str, overrides: list[str], backbone: str = "minilm") -> dict:
        bb, desc = self.backbone(backbone)
        rc, seconds, recs = self.sparsetune(case, bb + overrides)
        rec = recs[0] if recs else {}
        ok = rc == 0 and len(recs) == 1 and finite_completed(rec)
        cost = rec.get("cost", {})
        return {"ok": ok, "seconds": seconds, "backbone": desc, "method": rec.get("method"),
                "precision": rec.get("precision"), "device": rec.get("device"),
                "test": (rec.get("metrics") or {}).get("test", {}).get("accuracy"),
                "seconds_per_step": cost.get("seconds_per_step"), "peak_memory_mb": cost.get("peak_memory_mb"),
                "note": "" if ok else f"rc {rc}, status {rec.get('status')}: {rec.get('error', 'see log')}"}

    def case_sweep(self) -> dict:
        bb, desc = self.backbone("minilm")
        rc, seconds, recs = self.sparsetune("sweep/parallel", bb + [
            "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "method=sparse,lora", "train.precision=bf16"],
            multirun=True)
        ok = rc == 0 and len(recs) == 2 and all(finite_completed(r) for r in recs)
        return {"ok": ok, "seconds": seconds, "backbone": desc,
                "note": f"{sum(finite_completed(r) for r in recs)} of 2 jobs completed"}

    def case_determinism(self) -> dict:
        bb, desc = self.backbone("minilm")
        out = {}
        for det in ("true", "false"):
            pair = [self.sparsetune(f"determinism/{det}{i}", bb + ["method=sparse", "train.precision=bf16",
                                                                     f"train.deterministic={det}"]) for i in (0, 1)]
            recs = [p[2][0] if p[2] else {} for p in pair]
            same = all(finite_completed(r) for r in recs) and recs[0].get("metrics") == recs[1].get("metrics") \
                and recs[0].get("weights_sha256") == recs[1].get("weights_sha256")
            out[det] = same
        return {"ok": out["true"], "seconds": None, "backbone": desc,
                "note": f"deterministic=true repeats bit for bit: {out['true']}; "
                        f"deterministic=false repeats: {out['false']}"}

    def case_bench(self) -> dict:
        out = self.work / "bench"
        backbone = self.args.backbone
        # On a GPU steps take milliseconds: bench's default 20 timed steps and its cached variants, without its
        # memory children (each run above measured its own); --quick (3 steps) where the tests run it on the CPU.
        speed = ["--skip-memory"] if self.device == "cuda" else ["--quick"]
        argv = [sys.executable, str(REPO / "scripts" / "bench.py"), *speed, "--device", self.device,
                "--precision", "bf16", "--out", str(out), "--backbone", backbone]
        if self.args.minilm and backbone == "minilm":   # bench composes configs itself: point it at the folder
            argv += ["--override", "backbone.package=null", f"backbone.hub_id={Path(self.args.minilm).resolve()}"]
        env = {"SPARSETUNE_DATA_DIR": str(Path(self.args.data_dir).resolve())} if self.args.data_dir else {}
        rc, seconds = run_cmd(argv, self.work / "bench.log", self.args.timeout, env)
        ok = rc == 0 and out.with_suffix(".json").is_file()
        self.bench = json.loads(out.with_suffix(".json").read_text()) if ok else None
        return {"ok": ok, "seconds": seconds, "backbone": backbone, "note": "" if ok else f"rc {rc}, see bench.log"}

    def plan(self) -> dict:
        cuda = self.device == "cuda"
        cases = {f"bf16/{m}": (self.case_run, f"bf16/{m}", [f"method={m}", "train.precision=bf16"]) for m in METHODS}
        for m in ("sparse", "full"):
            cases[f"fp16/{m}"] = (self.case_run, f"fp16/{m}", [f"method={m}", "train.precision=fp16"]) if cuda \
                else None
        cases["smollm2/sparse"] = (self.case_run, "smollm2/sparse",
                                   ["method=sparse", "train.precision=bf16", "train.batch_size=16"], "smollm")
        cases["smollm2/sparse-bf16-backbone"] = (self.case_run, "smollm2/sparse-bf16-backbone",
                                                 ["method=sparse", "train.precision=bf16", "backbone.dtype=bf16",
                                                  "train.batch_size=16"], "smollm")
        cases["sweep/parallel"] = (self.case_sweep,)
        cases["determinism"] = (self.case_determinism,)
        if self.args.cases:
            cases = {k: v for k, v in cases.items() if k in self.args.cases.split(",")}
        return cases

    def run(self) -> bool:
        cases = self.plan()
        runnable = {k: v for k, v in cases.items() if v is not None}
        for k in cases.keys() - runnable.keys():
            self.results[k] = {"ok": None, "note": "skipped: fp16 autocast and loss scaling need CUDA"}
        # Runs share the GPU (memory is per process, so peak memory stays exact); step-time ratios come from the
        # bench below, which runs alone.
        with ThreadPoolExecutor(self.args.workers) as pool:
            futures = {k: pool.submit(v[0], *v[1:]) for k, v in runnable.items()}
            for k, f in futures.items():
                self.results[k] = f.result()
                print(f"{k}: {'pass' if self.results[k]['ok'] else 'FAIL'} {self.results[k].get('note', '')}",
                      flush=True)
        self.bench = None
        if not self.args.cases or "bench" in self.args.cases.split(","):
            self.results["bench"] = self.case_bench()
            print(f"bench: {'pass' if self.results['bench']['ok'] else 'FAIL'}", flush=True)
        return all(r["ok"] is not False for r in self.results.values())


def environment(device: str) -> dict:
    import torch
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    for pkg in ("torch", "transformers", "peft", "accelerate", "hydra-core", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def report(check: Check, env: dict, seconds: float) -> str:
    fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)   # noqa: E731
    res = check.results
    lines = ["# GPU check", "",
             f"`python scripts/gpu_check.py {' '.join(sys.argv[1:])}` on **{env['device']}**, {env['date']}; "
             f"{seconds / 60:.1f} minutes in all. " + ", ".join(f"{k} {v}" for k, v in env.items()
                                                                if k not in ("device", "date")) + ".", "",
             f"Every case ran {check.args.steps} optimizer steps of task=intent (real CLINC150 rows) unless "
             f"noted; up to {check.args.workers} cases shared the device at once, so a case's s/step (its first "
             f"steps included) is no speed: the ratios below are.", "",
             "| case | result | backbone | precision | test accuracy | s/step | peak memory MB | note |",
             "|---|---|---|---|---|---|---|---|"]
    for k, r in res.items():
        verdict = {True: "pass", False: "**FAIL**", None: "skipped"}[r["ok"]]
        lines.append(f"| {k} | {verdict} | {r.get('backbone', '-')} | {r.get('precision') or '-'} | "
                     f"{fmt(r.get('test'))} | {fmt(r.get('seconds_per_step'))} | "
                     f"{fmt(r.get('peak_memory_mb'), '{:.0f}')} | {r.get('note', '')} |")
    full = res.get("bf16/full", {})
    bench = check.bench
    if full.get("peak_memory_mb") or bench:
        lines += ["", "Ratios to full finetuning in bf16: peak memory from each run's own process "
                  "(torch.cuda.max_memory_allocated), step time from `scripts/bench.py` (interleaved, alone on the "
                  "device; a name ending in _cached trains from the frozen-bottom cache).", "",
                  "| method | peak memory ÷ full | step time ÷ full |", "|---|---|---|"]
        for m in METHODS + [v for v in (bench["train"] if bench else {}) if v not in METHODS]:
            r = res.get(f"bf16/{m}", {})
            mem = r["peak_memory_mb"] / full["peak_memory_mb"] if r.get("peak_memory_mb") and full.get(
                "peak_memory_mb") else None
            step = bench["train"][m]["step_ratio"] if bench and m in bench["train"] else None
            lines.append(f"| {m} | {fmt(mem, '{:.2f}')} | {fmt(step, '{:.2f}')} |")
    if bench:
        lines += ["", "Inference throughput (bench, bf16 autocast, batch "
                  f"{bench['settings']['batch_size']} x {bench['settings']['seq_len']} tokens):", "",
                  "| model | examples/s | ÷ base |", "|---|---|---|"]
        for k, v in bench["inference_examples_per_second"].items():
            lines.append(f"| {k} | {v:.0f} | {bench['inference_ratio_to_base'][k]:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "results" / "gpu_check.md"))
    p.add_argument("--data-dir", help="the data bundle (default: as `sparsetune run` finds it)")
    p.add_argument("--minilm", help="a MiniLM model folder (e.g. the bf16 copy in .gpu_bundle) instead of the package")
    p.add_argument("--smollm", help="a SmolLM2 folder: weights, or only config and tokenizer (random weights)")
    p.add_argument("--backbone", default="minilm", help="minilm (MiniLM and SmolLM2), or a tiny one for tests")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workers", type=int, default=3, help="cases sharing the device at once")
    p.add_argument("--timeout", type=int, default=600, help="seconds per case")
    p.add_argument("--work", help="folder for each case's runs and logs (default: a new temporary folder)")
    p.add_argument("--cases", help="comma-separated subset of the case names (and bench)")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)   # tests: the same cases on the CPU
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("no CUDA device: nothing checked")
        return 0
    t0 = time.perf_counter()
    check = Check(args)
    ok = check.run()
    md = report(check, environment(check.device), time.perf_counter() - t0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(md)
    print(md)
    print(f"wrote {args.out}; work folders and logs in {check.work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
