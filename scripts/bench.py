"""Training-step and inference cost of every method, side by side in one process, as ratios to full finetuning.

All methods get the same fixed batches (real task text padded to --seq-len). Timing rounds are
interleaved (one step of each method per round) so a load change on the shared CPU hits every
method alike; the median over rounds after warm-up is reported. Peak memory is measured per
method in a child process (RSS on CPU, max allocated on CUDA), since one process's RSS cannot be
split between methods. Writes JSON and a Markdown table.

    python scripts/bench.py                 # MiniLM, batch 32 x 64 tokens, 20 timed steps
    python scripts/bench.py --quick         # under a minute (28 s here): batch 16, 3 steps, no variants or memory
    python scripts/bench.py --quick --device cuda --precision bf16    # on a GPU, as train.precision=auto runs there
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sparsetune_cli import bottom_cache  # noqa: E402
from sparsetune_cli.config import compose  # noqa: E402
from sparsetune_cli.data import load_task, tokenize  # noqa: E402
from sparsetune_cli.methods import METHODS, count_params, get_method  # noqa: E402
from sparsetune_cli.models import load_model, load_tokenizer  # noqa: E402
from sparsetune_cli.train import method_context, prepare_model  # noqa: E402

TRAIN_METHODS = ["full"] + sorted(m for m in METHODS if m != "full")   # every registered method, full first
# Rows that are a method with other settings: name -> (method, config overrides). A name ending in _cached trains
# from the frozen-bottom cache (train.cache_bottom): its batches carry the bottom's output, computed beforehand.
VARIANTS = {"sparse_cached": ("sparse", []),
            "layer_select_cached": ("layer_select", ["train.frozen_dropout=false"]),
            "head_only_cached": ("head_only", ["train.frozen_dropout=false"]),
            "sparse_frozen_dropout": ("sparse", ["train.frozen_dropout=true"]),
            "head_only_no_frozen_dropout": ("head_only", ["train.frozen_dropout=false"]),
            # another autocast dtype than --precision: on a CPU with bf16 matrix units (Intel AMX) bf16 is the
            # faster one, as on a GPU
            "full_bf16": ("full", ["train.precision=bf16"]),
            "sparse_bf16": ("sparse", ["train.precision=bf16"])}


_data_cache: dict = {}


def fixed_batches(cfg, seq_len: int, batch_size: int, n: int):
    """Tokenizer, task data, tokenized splits and n batches of exactly batch_size x seq_len (padded to the
    full length so methods see equal work); loaded once and shared by every method."""
    key = (cfg.backbone.name, cfg.task.name, seq_len, batch_size, n)
    if key not in _data_cache:
        tok = load_tokenizer(cfg.backbone)
        data = load_task(cfg.task, cfg.data_dir)
        ds, _ = tokenize(data, tok, seq_len)
        rows = [ds["train"][i] for i in range(batch_size * n)]
        batches = [tok.pad(rows[b * batch_size:(b + 1) * batch_size], padding="max_length", max_length=seq_len,
                           return_tensors="pt") for b in range(n)]
        _data_cache[key] = tok, data, ds, batches
    return _data_cache[key]


class Built(NamedTuple):
    model: torch.nn.Module
    method: object
    opt: torch.optim.Optimizer
    batches: list
    precision: str   # the autocast dtype its training steps run in


def build(args, name: str) -> Built:
    """A model prepared by the method (or variant) `name`, its optimizer, the fixed batches and its precision.
    The precision is the composed config's train.precision (set by a variant or --override); its default,
    auto, means --precision."""
    method_name, overrides = VARIANTS.get(name, (name, []))
    cfg = compose([f"backbone={args.backbone}", f"method={method_name}", f"task={args.task}",
                   f"train.batch_size={args.batch_size}", f"task.max_length={args.seq_len}",
                   f"task.train_limit={max(args.batch_size * 20, 400)}", *overrides, *args.override])
    tok, data, ds, batches = fixed_batches(cfg, args.seq_len, args.batch_size, args.batches)
    model = load_model(cfg.backbone, len(data.labels), tok, seed=0)
    method = get_method(cfg.method)
    model = prepare_model(cfg, method, model, method_context(cfg, data, ds, tok)).to(args.device)
    if name.endswith("_cached"):
        batches = cached_batches(cfg, model, tok, ds, args)
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.method.lr, weight_decay=cfg.train.weight_decay,
                            fused=cfg.train.optimizer == "adamw_torch_fused")   # as the Trainer builds it
    precision = SETTINGS["precision"] if cfg.train.precision == "auto" else cfg.train.precision
    return Built(model, method, opt, batches, precision)


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SETTINGS = {"device": "cpu", "precision": "fp32"}   # set once by main() from --device/--precision


def autocast(precision: str | None = None):
    dtype = AUTOCAST[precision or SETTINGS["precision"]]
    return torch.autocast(SETTINGS["device"], dtype=dtype or torch.float32, enabled=dtype is not None)


def now() -> float:
    """Wall time after the GPU has finished what was queued (CUDA kernels run asynchronously)."""
    if SETTINGS["device"] == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class NotApplicable(Exception):
    """A variant that does not apply to this backbone (e.g. a cache where every block trains)."""


def cached_batches(cfg, model, tok, ds, args) -> list[dict]:
    """The same fixed batches, each with its rows' frozen-bottom output from a cache built here (not timed)."""
    import tempfile
    rows = ds["train"].select(range(args.batch_size * args.batches))
    pad = lambda feats: tok.pad(feats, padding="max_length", max_length=args.seq_len, return_tensors="pt")  # noqa: E731
    _, collate, info = bottom_cache.attach(cfg, model, tok, {"train": rows}, pad,
                                           Path(tempfile.mkdtemp(prefix="bench-cache-")))
    if not info["used"]:
        raise NotApplicable(info["reason"])
    return [collate([dict(rows[i], cache_index=i) for i in range(b * args.batch_size, (b + 1) * args.batch_size)])
            for b in range(args.batches)]


def train_step(model, opt, batch, precision: str | None = None) -> tuple[float, float, float]:
    """One optimizer step; returns the seconds spent in forward, backward and the optimizer. fp16 would need
    loss scaling for a real run; one step's time does not depend on it."""
    model.train()
    t0 = now()
    with autocast(precision):
        loss = model(**batch).loss
    t1 = now()
    loss.backward()
    t2 = now()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, now() - t2


@torch.no_grad()
def forward_only(model, batch):
    model.train()  # same dropout work as a training step's forward
    with autocast():
        model(**batch)
    now()


@torch.no_grad()
def infer(model, batch):
    model.eval()
    with autocast():
        model(**batch)
    now()


def optimizer_state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def interleaved(jobs: dict, steps: int, warmup: int, n_batches: int, phases: dict | None = None) -> dict[str, float]:
    """Median seconds per call of each job, one call of every job per round; round r gives every job its own
    batch number r % n_batches (the same rows for all; a cached variant's batch also carries their cached
    bottom). Jobs that return a tuple of phase times (train_step) also get the median of each phase in `phases`."""
    times = {k: [] for k in jobs}
    parts: dict[str, list] = {k: [] for k in jobs}
    for r in range(warmup + steps):
        for name, fn in jobs.items():
            t0 = now()
            out = fn(r % n_batches)
            t = now() - t0
            if r >= warmup:
                times[name].append(t)
                if isinstance(out, tuple):
                    parts[name].append(out)
    if phases is not None:
        phases.update({k: [statistics.median(x) for x in zip(*v)] for k, v in parts.items() if v})
    return {k: statistics.median(v) for k, v in times.items()}


def memory_child(args, method_name: str) -> float:
    """Peak memory of a few training steps of one method, in a fresh process."""
    cmd = [sys.executable, __file__, "--memory-of", method_name, "--backbone", args.backbone, "--task", args.task,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", str(args.threads),
           "--device", args.device, "--precision", args.precision, "--override", *args.override]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    # The process peak is set by loading data and model (the same for every method); what training
    # adds on top of that is the comparable part.
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    return rec["peak_mb"] - rec["base_mb"]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_while(fn) -> tuple[float, float]:
    """(resident MB before fn, highest resident MB while fn runs). CPU: RSS sampled every 0.5 ms
    by a thread, since ru_maxrss only knows the peak of the whole process; CUDA: max allocated."""
    import threading
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        fn()
        return before, torch.cuda.max_memory_allocated() / 2**20
    before, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.0005)
    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return before, max(peak[0], rss_mb())


def run_memory_child(args):
    args.batches = 2
    if args.memory_of == "forward_only":
        b = build(args, "full")
        before, peak = peak_while(lambda: [forward_only(b.model, x) for x in b.batches * 2])
    else:
        b = build(args, args.memory_of)
        before, peak = peak_while(lambda: [train_step(b.model, b.opt, x, b.precision) for x in b.batches * 2])
    # The loaded model is the same for every method; what training adds on top of it is comparable.
    print(json.dumps({"peak_mb": peak, "base_mb": before}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--task", default="intent")
    p.add_argument("--batch-size", type=int, help="default 32 (16 with --quick)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batches", type=int, default=4, help="distinct fixed batches cycled through")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--methods", help=f"comma-separated (default: all of {TRAIN_METHODS + list(VARIANTS)}; "
                                     "--quick leaves out the variants)")
    p.add_argument("--quick", action="store_true", help="batch 16, 3 steps, 1 warm-up, no variants or memory children")
    p.add_argument("--skip-memory", action="store_true", help="no memory children (timing only)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=list(AUTOCAST), help="autocast dtype of forward passes")
    p.add_argument("--override", nargs="*", default=[], help="config overrides for every method, e.g. "
                   "backbone.package=null backbone.hub_id=FOLDER")
    p.add_argument("--out", default=str(REPO / "results" / "bench"))
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    SETTINGS.update(device=args.device, precision=args.precision)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        return run_memory_child(args)
    if args.quick:
        args.steps, args.warmup, args.batches = 3, 1, 2
    args.batch_size = args.batch_size or (16 if args.quick else 32)
    methods = args.methods.split(",") if args.methods else TRAIN_METHODS + ([] if args.quick else list(VARIANTS))
    assert "full" in methods, "ratios are to full finetuning: keep it in --methods"

    built = {}
    for m in methods:
        try:
            built[m] = build(args, m)
        except NotApplicable as e:
            print(f"{m}: left out ({e})", file=sys.stderr)
    methods = list(built)
    batches = built["full"].batches
    jobs = {m: (lambda i, b=built[m]: train_step(b.model, b.opt, b.batches[i], b.precision)) for m in methods}
    jobs["forward_only"] = lambda i: forward_only(built["full"].model, batches[i])
    phases: dict[str, list[float]] = {}
    step = interleaved(jobs, args.steps, args.warmup, len(batches), phases)

    rows = {}
    for m in methods:
        counts = count_params(built[m].model)
        rows[m] = {"step_seconds": step[m], "precision": built[m].precision,
                   "trainable_params": counts["trainable_params"],
                   "trainable_params_without_head": counts["trainable_params_without_head"],
                   "optimizer_state_bytes": optimizer_state_bytes(built[m].opt),
                   **dict(zip(("forward_seconds", "backward_seconds", "optimizer_seconds"), phases[m]))}
    rows["forward_only"] = {"step_seconds": step["forward_only"]}
    if not (args.quick or args.skip_memory):
        for m in methods + ["forward_only"]:
            rows[m]["peak_memory_mb"] = memory_child(args, m)

    # Inference throughput of the trained models: base vs merged sparse vs LoRA (un)merged vs prefix.
    base_cfg = compose([f"backbone={args.backbone}", *args.override]).backbone
    infer_models = {"base": load_model(base_cfg, built["full"].model.config.num_labels,
                                       load_tokenizer(base_cfg)).to(args.device)}
    if "sparse" in built:
        infer_models["sparse_merged"] = built["sparse"].method.export(built["sparse"].model)
    if "lora" in built:  # merge a copy: merge_and_unload changes the module in place
        infer_models["lora_unmerged"] = built["lora"].model
        infer_models["lora_merged"] = copy.deepcopy(built["lora"].model).merge_and_unload()
    if "prefix" in built:
        infer_models["prefix"] = built["prefix"].model
    # One interleaved pass for all, so every ratio to base compares rounds run under the same load
    inf = interleaved({k: (lambda i, m=m: infer(m, batches[i])) for k, m in infer_models.items()},
                      args.steps, args.warmup, len(batches))
    throughput = {k: args.batch_size / v for k, v in inf.items()}

    full = rows["full"]
    for r in rows.values():
        r["step_ratio"] = r["step_seconds"] / full["step_seconds"]
        if "peak_memory_mb" in r:
            r["memory_ratio"] = r["peak_memory_mb"] / full["peak_memory_mb"]
        if "optimizer_state_bytes" in r:
            r["optimizer_state_ratio"] = r["optimizer_state_bytes"] / max(1, full["optimizer_state_bytes"])
    result = {"settings": {k: v for k, v in vars(args).items() if k != "memory_of"},
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "cuda": torch.cuda.is_available(), "device": args.device,
                          "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                          "python": platform.python_version(),
                          "torch": torch.__version__, "load_average": os.getloadavg()},
              "train": rows, "inference_examples_per_second": throughput,
              "inference_ratio_to_base": {k: v / throughput["base"] for k, v in throughput.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = markdown(result, " ".join(sys.argv[1:]))
    out.with_suffix(".md").write_text(md)
    print(md)


def markdown(result, argv: str) -> str:
    s = result["settings"]
    lines = [f"# Training and inference cost ({s['backbone']}, batch {s['batch_size']} x {s['seq_len']} tokens)", "",
             f"Command: `python scripts/bench.py {argv}`. Machine: {result['machine']['cpus']} CPUs, "
             f"{result['machine']['torch_threads']} torch threads, CUDA {result['machine']['cuda']}, "
             f"ran on {result['machine'].get('gpu') or result['machine'].get('device', 'cpu')} in "
             f"{s.get('precision', 'fp32')}, "
             f"load average at the end {tuple(round(x, 2) for x in result['machine']['load_average'])}. "
             f"Median of {s['steps']} interleaved steps after {s['warmup']} warm-up.", "",
             "| method | step s | step ÷ full | training memory MB | memory ÷ full | optimizer state MB | trainable (no head) |",
             "|---|---|---|---|---|---|---|"]
    for m, r in result["train"].items():
        mem = f"{r['peak_memory_mb']:.0f} | {r['memory_ratio']:.2f}" if "peak_memory_mb" in r else "- | -"
        opt = f"{r['optimizer_state_bytes'] / 2**20:.2f}" if "optimizer_state_bytes" in r else "-"
        tp = f"{r['trainable_params']:,} ({r['trainable_params_without_head']:,})" if "trainable_params" in r else "-"
        lines.append(f"| {m} | {r['step_seconds']:.3f} | {r['step_ratio']:.2f} | {mem} | {opt} | {tp} |")
    variants = [f"`{v}` is {m}" + (f" with {' '.join(o)}" if o else "")
                + (" trained from the frozen-bottom cache" if v.endswith("_cached") else "")
                for v, (m, o) in VARIANTS.items() if v in result["train"]]
    if variants:
        lines += ["", "Variants: " + "; ".join(variants) + ". train.frozen_dropout=false means no dropout in the "
                  "frozen embeddings and the blocks below the lowest trainable one (sparse's default). "
                  "`forward_only` is full's forward in training mode, no backward."]
    lines += ["", "Where a training step's time goes (median seconds per phase; ÷ the same phase of full):", "",
              "| method | forward | backward | optimizer |", "|---|---|---|---|"]
    full = result["train"]["full"]
    for m, r in result["train"].items():
        if "forward_seconds" in r:
            lines.append(f"| {m} | " + " | ".join(
                f"{r[k]:.3f} ({r[k] / full[k]:.2f})" for k in ("forward_seconds", "backward_seconds", "optimizer_seconds"))
                + " |")
    lines += ["", "| model (inference) | examples/s | ÷ base |", "|---|---|---|"]
    for k, v in result["inference_examples_per_second"].items():
        lines.append(f"| {k} | {v:.0f} | {result['inference_ratio_to_base'][k]:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
