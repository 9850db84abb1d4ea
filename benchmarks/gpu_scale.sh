#!/usr/bin/env bash
# GPU at the published scale (issue 11), for a machine with an NVIDIA GPU: a random-weight checkpoint of
# ml-tarflow's AFHQ-256 shape (1.8 GB, T = 1024, 768 channels, 8 blocks x 8 layers), then for torch-cuda
# at fp32 and bf16 (and every engine backend installed there: ort-cuda, ort-trt, tensorrt):
#   - one `step` (a token, cache write included) against the time to read one block's weights from HBM,
#   - one `jacobi` pass against the tensor-core floor of its FLOPs,
#   - whole-sample latency at batch 1 and 16 for `sequential` and for SJD with the paper's AFHQ iteration
#     counts (fixed: timing only), against ml-tarflow's loop in fp32 and under bf16 autocast (measured on
#     the first sampling block; every block has the same shape, so a whole sample is 8x that),
# each figure with its ratio to its floor. Writes ${OUT:-out/gpu_scale}: summary.txt, log.txt,
# measure_<backend>.json per backend and floors.json. Budget: under 10 minutes (each stage has a timeout;
# a failed stage does not stop the others; engine backends are skipped when less than 4 minutes remain).
#   bash benchmarks/gpu_scale.sh                                          (from the repository root)
#   BACKENDS=torch SLIM=1 BATCHES=1 SAMPLE_BATCHES=1 TORCH_THREADS=1 bash benchmarks/gpu_scale.sh  (dry run, CPU)
set -uo pipefail
OUT=${OUT:-out/gpu_scale}
mkdir -p "$OUT"
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
CONFIG=${CONFIG:-afhq256}
BATCHES=${BATCHES:-1,16}
SAMPLE_BATCHES=${SAMPLE_BATCHES:-1,16}
SLIM_FLAG=(); [ -n "${SLIM:-}" ] && SLIM_FLAG=(--slim)
SCALE="$PY benchmarks/paper_scale.py $CONFIG ${SLIM_FLAG[*]}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT/log.txt
SUMMARY=$OUT/summary.txt
: > "$LOG"; : > "$SUMMARY"
. "$(dirname "$0")/gpu_lib.sh"  # say, stage

say "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" \
  2>&1 | tee -a "$SUMMARY"

backends=()
if [ -n "${BACKENDS:-}" ]; then read -ra backends <<< "$BACKENDS"; else
  backends=(torch-cuda torch-cuda:bf16)
  for be in ort-cuda ort-trt tensorrt; do
    reason=$($PY -c "from sejd.engines import unavailable; print(unavailable('$be') or '')" 2>&1)
    if [ -z "$reason" ]; then backends+=("$be"); else say "skip $be: $reason"; fi
  done
fi
say "backends: ${backends[*]}"

CKPT=$WORK/$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); import paper_scale as p
print(p.checkpoint_name(p.shape_of('$CONFIG', bool('${SLIM:-}'))))")
stage "make checkpoint" 150 $SCALE --stage make --path "$CKPT" || { say "no checkpoint: stop"; exit 1; }
ls -l "$CKPT" | tee -a "$SUMMARY"

MEASURE=(--batch "$BATCHES" --sample-batch "$SAMPLE_BATCHES" --runs 10 --warmup 3 --sample-runs 1
         ${TORCH_THREADS:+--torch-threads "$TORCH_THREADS"})
for be in "${backends[@]}"; do
  tag=${be//:/_}
  refs=none; [[ $be == torch-cuda || $be == torch ]] && refs=fp32,bf16  # ml-tarflow's loop: measured once
  case $be in
    torch*) source=$CKPT ;;
    *)  # engines: the graphs the device runner calls, built for this backend
      if (( SECONDS > 360 )); then say "skip $be: under 4 minutes left"; continue; fi
      source=$WORK/bundle
      [ -d "$source" ] || stage "export" 240 $PY -m sejd.cli export "$CKPT" -o "$source" \
        --variants step_rows,window,jacobi || continue
      stage "build $be" 240 $PY -m sejd.cli build "$source" --backend "$be" || continue ;;
  esac
  stage "measure $be" 200 $SCALE --stage measure --path "$source" --backend "$be" "${MEASURE[@]}" \
    --reference-precisions "$refs" --json "$OUT/measure_$tag.json"
done

# Floors, from the checkpoint's own tensors (memory-mapped, not loaded) and the GPU's datasheet figures.
$PY - "$CKPT" "$OUT" <<'EOF' 2>&1 | tee -a "$SUMMARY"
import json, pathlib, sys
import torch

# NVIDIA H200 SXM datasheet: HBM3e bandwidth 4.8 TB/s; dense tensor-core peak 989 TFLOPS in BF16
# (1,979 with sparsity). PyTorch's fp32 matrix products do not use TF32 by default
# (torch.backends.cuda.matmul.allow_tf32 is False), so the fp32 floor is the 67 TFLOPS FP32 peak.
HBM_BYTES_PER_S = 4.8e12
PEAK_FLOPS = {"fp32": 67e12, "bf16": 989e12}
ckpt, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
sd = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True)
blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
k = blocks - 2  # the block the latency rows measure (a Jacobi block of the SJD plan)
own = {n: t for n, t in sd.items() if n.startswith(f"blocks.{k}.") and not n.endswith("attn_mask")}
weights = sum(t.numel() for t in own.values())  # what one step reads once
matmul = sum(t.numel() for n, t in own.items() if n.endswith(".weight") and t.dim() == 2)
T, C = sd[f"blocks.{k}.pos_embed"].shape
layers = len({n.split(".")[3] for n in own if ".attn_blocks." in n})
floors = {"block_parameters": weights, "matmul_parameters": matmul, "tokens": T, "channels": C, "layers": layers,
          "hbm_bytes_per_s": HBM_BYTES_PER_S, "peak_flops": PEAK_FLOPS, "rows": []}
measured = [json.loads(f.read_text()) for f in sorted(out.glob("measure_*.json"))]
refs = {(r["precision"], r["batch"]): r["seconds_median"] * blocks  # every block has the same shape and cost
        for m in measured for r in m["reference_first_block"]}
floors["reference_whole_sample_seconds"] = {f"{p} batch {b}": sec for (p, b), sec in sorted(refs.items())}
for m in measured:
    precision = "bf16" if m["backend"].endswith("bf16") else "fp32"
    for r in m["latency"]:
        rows = r["batch"]  # no guidance: one row per sample
        if r["variant"] in ("step", "step_rows"):  # the runner's step (torch*) or the graph (engines)
            floor = weights * (2 if precision == "bf16" else 4) / HBM_BYTES_PER_S
        elif r["variant"] == "jacobi":  # dense products over all T tokens; scores and values over T x T
            flops = 2 * rows * T * matmul + 4 * rows * layers * T * T * C
            floor = flops / PEAK_FLOPS[precision]
        else:
            continue
        ratio = r["ms_median"] / 1e3 / floor
        floors["rows"].append({"backend": m["backend"], "op": r["variant"], "batch": r["batch"],
                               "ms": r["ms_median"], "floor_ms": floor * 1e3, "ratio": ratio})
        print(f"{m['backend']:<16} {r['variant']:<7} batch {r['batch']:>3} {r['ms_median']:9.3f} ms, "
              f"floor {floor * 1e3:9.4f} ms ({'HBM' if r['variant'] == 'step' else 'compute'}): {ratio:6.2f}x")
    for s in m["sampling"]:
        against = ", ".join(f"{sec / s['seconds_median']:.1f}x faster than ml-tarflow's loop ({p})"
                            for (p, b), sec in sorted(refs.items()) if b == s["batch"])
        print(f"{m['backend']:<16} batch {s['batch']:>3} {s['seconds_median']:8.3f} s  {s['plan']}  {against}")
for (p, b), sec in sorted(refs.items()):
    print(f"ml-tarflow's loop ({p}) batch {b:>3}: {sec:8.3f} s ({blocks}x its first sampling block)")
(out / "floors.json").write_text(json.dumps(floors, indent=1))
EOF
say "done in $SECONDS s"
