#!/usr/bin/env bash
# GPU check (issue 5), for a machine with an NVIDIA GPU. Runs the GPU tests, then for every available
# GPU backend: build (engine backends), `sejd tune` at each batch size, `sejd check`, `sejd bench` at
# batch 1 and 64; and the torch-cuda latency table (eager vs CUDA graphs, per precision). Writes 7
# files to ${OUT:-out/gpu}: summary.txt, log.txt, checks.json, bench.json, bench.png (fp32 torch-cuda),
# cuda_latency.json, plans.json. Budget: about 6 minutes on an H200 (each stage has its own timeout; a
# failed stage does not stop the others). Backends: torch-cuda at fp32, bf16 and fp16 always (PyTorch +
# CUDA); ort-cuda / ort-trt where onnxruntime-gpu is installed; tensorrt where the tensorrt package is.
#   bash benchmarks/gpu_check.sh                                 (from the repository root)
#   BACKENDS=ort-cpu BATCHES=1,4 bash benchmarks/gpu_check.sh   (a dry run of the script on a CPU)
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
BATCHES=${BATCHES:-1,64}
SEJD="$PY -m sejd.cli"
B=${BUNDLE:-/tmp/sejd_gpu_bundle}
WORK=$(mktemp -d)
LOG=$OUT/log.txt
SUMMARY=$OUT/summary.txt
: > "$LOG"; : > "$SUMMARY"
. "$(dirname "$0")/gpu_lib.sh"  # say, stage
PYTEST="$PY -m pytest -q -p no:cacheprovider -o filterwarnings=default"

say "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
$PY - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("onnxruntime", "tensorrt", "polygraphy", "onnx"):
    try:
        m = importlib.import_module(name)
        extra = m.get_available_providers() if name == "onnxruntime" else ""
        print(name, m.__version__, extra)
    except Exception as e:
        print(name, "missing:", e)
EOF

backends=()
if [ -n "${BACKENDS:-}" ]; then read -ra backends <<< "$BACKENDS"; else
  backends=(torch-cuda torch-cuda:bf16 torch-cuda:fp16)
  for be in ort-cuda ort-trt tensorrt; do
    reason=$($PY -c "from sejd.engines import unavailable; print(unavailable('$be') or '')" 2>&1)
    if [ -z "$reason" ]; then backends+=("$be"); else say "skip $be: $reason"; fi
  done
fi
say "backends: ${backends[*]}"

if [[ " ${backends[*]} " == *" torch-cuda "* ]]; then
  # the capture path first: if CUDA graphs break, the rest still measures eager CUDA (and says so)
  if ! stage "pytest GPU" 150 $PYTEST -x tests/engines/test_torch_cuda.py tests/engines/test_tensorrt.py \
      tests/engines/test_engine_runner.py; then
    export SEJD_CUDA_GRAPHS=0
    say "!! GPU tests failed: the stages below run with SEJD_CUDA_GRAPHS=0 (eager CUDA)"
    stage "pytest GPU eager" 120 $PYTEST tests/engines/test_torch_cuda.py
  fi
  stage "cuda latency" 120 $PY benchmarks/cuda_latency.py builtin:textures --batch "$BATCHES" \
    --precision fp32,bf16,fp16 --json "$OUT/cuda_latency.json"
  $PY - "$OUT/cuda_latency.json" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(f"  {r['precision']} graphs={r['cuda_graphs']!s:<5} batch {r['batch']:>3} {r['op']:<16} {r['ms_median']:9.3f} ms")
EOF
fi

stage export 120 $SEJD export builtin:textures -o "$B" --force || { say "export failed"; exit 1; }
for be in "${backends[@]}"; do
  say "== $be"
  name=${be%%:*}; tag=${be//:/_}
  case $name in
    ort-*|tensorrt) stage "build $be" 300 $SEJD build "$B" --backend "$be" ${PRECISION:+--precision $PRECISION} ;;
  esac
  rm -rf "$B/plan.json" "$B/plans"
  for batch in ${BATCHES//,/ }; do
    stage "tune $be batch $batch" 150 $SEJD tune "$B" --backend "$be" --batch "$batch" --tau 0.5,0.2,0.1,0.05,0.02,0.01
  done
  mkdir -p "$WORK/plans/$tag" && cp "$B"/plans/*.json "$WORK/plans/$tag/" 2>/dev/null
  stage "check $be" 150 $SEJD check "$B" --backend "$be" --json "$WORK/check_$tag.json"
  $PY -c "import json,sys; d=json.load(open(sys.argv[1])); e=[c for c in d['checks'] if c['enforced']]
print(f\"check {d['backend']}: {sum(c['passed'] for c in e)}/{len(e)} enforced passed\", [c['name'] for c in e if not c['passed']])" \
    "$WORK/check_$tag.json" 2>&1 | tee -a "$SUMMARY"
  decoders=reference,sequential,ujd,sjd,gs-jacobi,auto
  [[ $be == *:* ]] && decoders=reference,sequential,ujd,auto
  plot=(); [ "$be" = torch-cuda ] && plot=(--plot "$OUT/bench.png")
  stage "bench $be" 180 $SEJD bench "$B" --backend "$be" --batch "$BATCHES" --runs 5 --decoders "$decoders" \
    --json "$WORK/bench_$tag.json" "${plot[@]}"
  $PY -c "import json,sys; from sejd.workflows.bench import table; print(table(json.load(open(sys.argv[1]))))" \
    "$WORK/bench_$tag.json" 2>&1 | tee -a "$SUMMARY"
done

$PY - "$WORK" "$OUT" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, pathlib, sys
work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for kind in ("check", "bench"):
    merged = {f.stem[len(kind) + 1:]: json.loads(f.read_text()) for f in sorted(work.glob(f"{kind}_*.json"))}
    (out / ("checks.json" if kind == "check" else "bench.json")).write_text(json.dumps(merged, indent=1))
plans = {f"{d.name}/{f.name}": json.loads(f.read_text()) for d in sorted((work / "plans").glob("*")) for f in d.glob("*.json")}
(out / "plans.json").write_text(json.dumps(plans, indent=1))
print("merged", sorted(p.name for p in out.iterdir()))
EOF
rm -rf "$WORK"
say "done in $SECONDS s"
