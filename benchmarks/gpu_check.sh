#!/usr/bin/env bash
# GPU check (issue 5), for a machine with an NVIDIA GPU: builds what that machine can, runs
# `sejd check` and `sejd bench` for every available GPU backend at batch 1 and 64, and writes JSON and a
# summary to ${OUT:-out/gpu}. Budget: 8 minutes. Backends: torch-cuda always (PyTorch + CUDA);
# ort-cuda / ort-trt only where onnxruntime-gpu is installed; tensorrt where its runner exists.
# Usage: bash benchmarks/gpu_check.sh            (from the repository root)
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
PY=${PY:-python3}
# offline machines: install sejd's pure-Python dependencies from a carried wheelhouse when present
if [ -d wheels ]; then $PY -m pip install -q --no-index --find-links wheels safetensors tqdm polygraphy onnxscript || true; fi
SEJD="$PY -m sejd.cli"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available()); print('onnxruntime', o.__version__, o.get_available_providers())" > "$OUT/versions.txt" 2>&1
B=$OUT/bundle
timeout 120 $SEJD export builtin:textures -o "$B" --force > "$OUT/export.log" 2>&1 || { echo "export failed"; tail "$OUT/export.log"; exit 1; }
backends=(torch-cuda)
$PY -c "import onnxruntime as o; exit(0 if 'CUDAExecutionProvider' in o.get_available_providers() else 1)" && backends+=(ort-cuda)
$PY -c "import onnxruntime as o; exit(0 if 'TensorrtExecutionProvider' in o.get_available_providers() else 1)" && backends+=(ort-trt)
summary=$OUT/summary.txt
: > "$summary"
for be in "${backends[@]}"; do
  echo "== $be" | tee -a "$summary"
  case $be in ort-*) timeout 120 $SEJD build "$B" --backend "$be" >> "$summary" 2>&1 ;; esac
  timeout 150 $SEJD check "$B" --backend "$be" --json "$OUT/check_$be.json" > "$OUT/check_$be.log" 2>&1
  echo "check exit $?: $(tail -n 1 "$OUT/check_$be.log")" | tee -a "$summary"
  timeout 180 $SEJD tune "$B" --backend "$be" --batch 64 > "$OUT/tune_$be.log" 2>&1
  timeout 120 $SEJD tune "$B" --backend "$be" --batch 1 >> "$OUT/tune_$be.log" 2>&1
  timeout 180 $SEJD bench "$B" --backend "$be" --batch 1,64 --runs 3 --json "$OUT/bench_$be.json" \
    --plot "$OUT/bench_$be.png" > "$OUT/bench_$be.log" 2>&1
  cat "$OUT/bench_$be.log" | tee -a "$summary"
done
