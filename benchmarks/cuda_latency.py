"""Latency of the torch-cuda runner's operations, with and without CUDA graphs, side by side.

Eager fp32 first, then with CUDA graphs at each --precision: one sequential step, one full Jacobi pass, 8 Jacobi passes in one call (`jacobi_chunk`), and the
whole exact inversion of a block (`sequential_loop`), at each batch size. Warm-up calls first (they
also capture the graphs), then the median of --runs calls, each ended by a device synchronisation.
The ratio `jacobi / step` is the figure behind selective Jacobi decoding: on a GPU one parallel pass
over all T tokens should cost about as much as one sequential step. JSON on stdout and in --json.

    python benchmarks/cuda_latency.py builtin:textures --batch 1,64 --precision fp32,bf16 --json out/cuda_latency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from sejd.core.files import write_json
from sejd.engines.torch_cuda import graph_runners
from sejd.model.checkpoint import load_checkpoint
from sejd.runtime.runner import Conditioning


def timed(fn, device, runs, warmup) -> tuple[float, list[float]]:
    """(median seconds, every run's seconds) of fn() after `warmup` calls, each run ended by a device sync."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def measure(source: str, batches, runs: int, warmup: int, block: int | None = None, precisions=("fp32",)) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint(source).to(device)
    cfg = model.config
    k = cfg.num_blocks - 2 if block is None else block
    rows = []
    for precision, cuda_graphs in [("fp32", False)] + [(p, True) for p in precisions]:
        runner = graph_runners(model, cuda_graphs=cuda_graphs, precision=precision)[k]
        for batch in batches:
            g = torch.Generator().manual_seed(batch)
            z = torch.randn(batch, cfg.num_tokens, cfg.token_dim, generator=g).to(device)
            x = torch.zeros_like(z)
            runner.begin(batch, Conditioning.build(batch, cfg.num_tokens))
            tok = z[:, 0]
            ops = {"step": lambda: runner.step(tok, 3), "jacobi": lambda: runner.jacobi_iter(z, x),
                   "jacobi_chunk8": lambda: runner.jacobi_chunk(z, x, 8),
                   "sequential_loop": lambda: runner.sequential_loop(z)}
            for op, fn in ops.items():
                n = max(3, runs // 4) if op == "sequential_loop" and not runner.cuda_graphs else runs
                rows.append({"op": op, "batch": batch, "cuda_graphs": runner.cuda_graphs, "precision": precision,
                             "ms_median": 1e3 * timed(fn, device, n, warmup)[0]})
                print(f"  {precision} graphs={runner.cuda_graphs!s:<5} batch {batch:>3} {op:<16} "
                      f"{rows[-1]['ms_median']:9.3f} ms", file=sys.stderr, flush=True)
    return {"source": source, "block": k, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "runs": runs, "warmup": warmup, "rows": rows}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="checkpoint or builtin:NAME")
    p.add_argument("--batch", default="1,64")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="fp32", help="comma-separated precisions measured with CUDA graphs "
                   "(fp32 is always measured eagerly too)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    result = measure(a.source, [int(b) for b in a.batch.split(",")], a.runs, a.warmup,
                     precisions=a.precision.split(","))
    if a.json:
        write_json(a.json, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
