#!/usr/bin/env bash
# Everything `scripts/gpu_check.py` needs on an offline GPU machine that has torch, transformers, peft and
# accelerate but not this project's venv: wheels of the rest, MiniLM in bf16 (45 MB instead of 90),
# SmolLM2's tokenizer and config (its weights do not fit beside MiniLM in 64 MiB: the check runs its
# architecture with random weights), and the five tasks' data. Writes .gpu_bundle/ (git-ignored).
#   make gpu-bundle, copy the repo with .gpu_bundle/ to the GPU machine, and there: bash scripts/gpu_offline.sh check
#   OUT_DIR (the check) or grid OUT_DIR (experiment=paper_full_gpu, the converged comparison)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=.gpu_bundle
PYVER=${GPU_PYTHON:-3.12}     # the GPU machine's Python
rm -rf "$OUT" && mkdir -p "$OUT/wheels"
pin() { grep -i "^$1==" constraints.txt; }
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT/wheels" "$(pin hydra-core)" "$(pin omegaconf)" "$(pin hydra-joblib-launcher)" "$(pin datasets)" \
  dill multiprocess
# datasets 5.1+ needs pyarrow>=24: an older machine gets 5.0 (pyarrow>=21) instead (scripts/gpu_offline.sh picks)
$PY -m pip download -q --no-deps --only-binary=:all: -d "$OUT/wheels/pyarrow-before-24" datasets==5.0.0
# antlr4 (hydra's parser) is published as source only: build its pure-Python wheel here
$PY -m pip wheel -q --no-deps -w "$OUT/wheels" antlr4-python3-runtime==4.9.3
$PY - "$OUT" <<'PY'
import shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer
from sparsetune_cli.config import compose
from sparsetune_cli.models import weights_location
out = Path(sys.argv[1])
minilm = Path(weights_location(compose(["backbone=minilm"]).backbone))
shutil.copytree(minilm, out / "minilm-bf16", ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx"))
for f in minilm.glob("*.safetensors"):
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(out / "minilm-bf16" / f.name),
              metadata={"format": "pt"})
bb = compose(["backbone=smollm2-135m"]).backbone
where = weights_location(bb)
AutoTokenizer.from_pretrained(where, gguf_file=bb.gguf_file).save_pretrained(out / "smollm2")
AutoConfig.from_pretrained(where, gguf_file=bb.gguf_file).save_pretrained(out / "smollm2")
PY
# the five tasks' data, compressed (13 MB of JSON Lines would not fit beside MiniLM): gpu_offline.sh unpacks it
DATA=${SPARSETUNE_DATA_DIR:-../shared/data}
tar czf "$OUT/data.tgz" -C "$DATA" --exclude 'oos_*' clinc150 trec banking77 srl abt_buy
du -sh "$OUT" "$OUT"/*
