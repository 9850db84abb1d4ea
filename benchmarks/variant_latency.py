"""Latency of one call of every graph variant on a built backend, next to its arithmetic floor.

Each graph (and, on ort-cpu, the native step and sequential block that replace the single-token graphs
there) is timed side by side in one process: warm-up calls, then the median of --runs calls. The floor is
the arithmetic the call must do (multiply-adds of its linear layers and of causal attention over the keys
it sees, x2 FLOPs) divided by this machine's measured matrix-multiply rate (a 1024^3 fp32 product on all
cores, PyTorch); `x floor` is how far the call is from it. Single tokens move a block's weights for very
little arithmetic, so `weights MB` is shown too (their floor is memory traffic, not FLOPs).

    python benchmarks/variant_latency.py BUNDLE --backend ort-cpu --batch 1,16 --json docs/latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from sejd.core.files import write_json
from sejd.engines.ort import OrtSessions
from sejd.export.bundle import load_bundle
from sejd.export.contracts import contract, dummy_inputs


def matmul_rate(threads: int, n: int = 1024, runs: int = 10) -> float:
    """FLOP/s of an n x n x n fp32 matrix product on `threads` threads (median of `runs`)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(old)
    return 2 * n**3 / statistics.median(times)


def macs_per_token(cfg) -> int:
    """Multiply-adds of one token's linear layers in one block (proj_in, qkv, proj, MLP, proj_out)."""
    C, E, L = cfg.channels, cfg.channels * cfg.expansion, cfg.layers_per_block
    P = 2 * cfg.token_dim if cfg.nvp else cfg.token_dim
    return cfg.token_dim * C + L * (4 * C * C + 2 * C * E) + C * P


def attention_macs(cfg, keys: int) -> int:
    """Multiply-adds of one query's attention over `keys` keys in one block (scores and weighted values)."""
    return cfg.layers_per_block * 2 * keys * cfg.channels


def flops(cfg, variant: str, rows: int, pos: int, window: int, unroll: int) -> float:
    """FLOPs of one call: the causal arithmetic the graph must do (2 per multiply-add)."""
    T = cfg.num_tokens
    token = macs_per_token(cfg)
    one_pass = T * token + sum(attention_macs(cfg, k + 1) for k in range(T))  # a Jacobi pass: T causal queries
    macs = {
        "step_rows": token + attention_macs(cfg, pos + 1),
        "step_present": token + attention_macs(cfg, pos + 1),
        "window": window * token + sum(attention_macs(cfg, pos + i + 1) for i in range(window)),
        "jacobi": one_pass,
        "jacobi_k": unroll * one_pass,
        "jacobi_loop": (T - 1) * one_pass,  # tau = 0: runs to its cap
        "sequential_loop": sum(token + attention_macs(cfg, p + 1) for p in range(T - 1)),
        "forward": cfg.num_blocks * one_pass,
    }[variant]
    return 2.0 * rows * macs


def call_times(fn, runs: int, warmup: int) -> list[float]:
    """Seconds of each of `runs` calls of fn, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


SINGLE_THREAD = ("step_rows", "step_present", "sequential_loop")  # as the runners call them (one thread)


def graph_calls(sessions: OrtSessions, variant: str, block: int, batch: int, pos: int, window: int):
    """The call of one built graph at one batch size, with contract-conformant inputs."""
    bundle = sessions.bundle
    c = contract(bundle.config, variant, bundle.unroll)
    sess = sessions.get(variant, None if variant == "forward" else block, single_thread=variant in SINGLE_THREAD)
    feeds = dummy_inputs(c, bundle.config, batch=batch, window=window, tau=0.0)
    if "pos" in feeds:
        feeds["pos"] = np.array(pos, np.int64)
    if "start" in feeds:  # the window must fit: start + window <= T
        feeds["start"] = np.array(min(pos, bundle.config.num_tokens - window), np.int64)
    return lambda: sess.run(None, feeds)


def graph_latency(sessions: OrtSessions, variant: str, block: int | None, batches, runs: int, warmup: int) -> list:
    """Median latency of one graph per batch size (no floors): rows of variant, batch, ms_median, ms_all."""
    rows = []
    for batch in batches:
        times = call_times(graph_calls(sessions, variant, block, batch, sessions.bundle.config.num_tokens // 2, 8),
                             runs, warmup)
        rows.append({"variant": variant, "batch": batch, "ms_median": 1e3 * statistics.median(times),
                     "ms_all": [1e3 * t for t in times]})
        print(f"{variant:<16} batch {batch:>3}: {rows[-1]['ms_median']:9.3f} ms", file=sys.stderr)
    return rows


def native_calls(bundle, nb, batch: int, pos: int):
    """The native step and sequential block of NativeBlock `nb` (what ort-cpu runs for single tokens)."""
    cfg = bundle.config
    g = np.random.default_rng(0)
    caches = [g.standard_normal((batch, cfg.num_heads, cfg.num_tokens, cfg.head_dim)).astype(np.float32)
              for _ in range(2 * cfg.layers_per_block)]
    temps = np.ones(batch, np.float32)
    labels = np.full(batch, -1, np.int64) if cfg.num_classes else None
    x = g.standard_normal((batch, cfg.token_dim)).astype(np.float32)
    z = g.standard_normal((batch, cfg.num_tokens, cfg.token_dim)).astype(np.float32) * 0.1
    pointers = nb.cache_pointers(caches)  # as a runner keeps them; its inputs are checked once, as here
    return {"step_rows": lambda: nb.step_unchecked(x, pos, pointers, labels, temps, None),
            "sequential_loop": lambda: nb.sequential(z, caches, labels, temps, None)}


def measure(bundle_path: str, backend: str, batches: list[int], block: int | None, runs: int, warmup: int,
            variants=None) -> dict:
    """Every graph variant of one block (default: all the bundle has) on `backend`, with floors."""
    import onnxruntime

    bundle = load_bundle(bundle_path)
    cfg = bundle.config
    block = cfg.num_blocks - 2 if block is None else block  # a Jacobi block of the SJD plan
    sessions = OrtSessions(bundle, backend)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rate = matmul_rate(cores)
    rate_1 = matmul_rate(1)
    print(f"matrix-multiply rate: {rate / 1e9:.1f} GFLOP/s on {cores} cores, {rate_1 / 1e9:.1f} on one",
          file=sys.stderr)
    pos, window = cfg.num_tokens // 2, 8  # a step from the middle of the sequence: a typical KV prefix
    weights_mb = 4 * (macs_per_token(cfg) + cfg.num_tokens * cfg.channels) / 1e6  # one block's, fp32
    nb = None
    if backend == "ort-cpu":
        from sejd.engines import native

        if native.available() is None:
            native.set_threads(None)  # all cores, as the ort-cpu runners use it
            nb = native.NativeBlock(bundle.load_model().blocks[block], cfg.num_tokens)
    rows = []
    for batch in batches:
        calls = [(v, "onnx", graph_calls(sessions, v, block, batch, pos, window)) for v in (variants or bundle.variants())]
        if nb is not None:
            calls += [(v, "native", fn) for v, fn in native_calls(bundle, nb, batch, pos).items()]
        for variant, engine, fn in calls:
            times = call_times(fn, runs, warmup)
            at = min(pos, cfg.num_tokens - window) if variant == "window" else pos  # as graph_calls feeds it
            f = flops(cfg, variant, batch, at, window, bundle.unroll)
            # the floor at the rate of the threads the call runs on: one for the ONNX single-token graphs
            r_used = rate_1 if engine == "onnx" and variant in SINGLE_THREAD else rate
            median = statistics.median(times)
            rows.append({"variant": variant, "engine": engine, "batch": batch, "ms_median": 1e3 * median,
                         "ms_all": [1e3 * t for t in times], "flops": f, "floor_ms": 1e3 * f / r_used,
                         "threads": 1 if r_used is rate_1 else cores,
                         "times_floor": median * r_used / f, "weights_mb": weights_mb * (
                             cfg.num_blocks if variant == "forward" else 1)})
            r = rows[-1]
            print(f"{variant:<16} {engine:<6} batch {batch:>3}: {r['ms_median']:9.3f} ms  floor {r['floor_ms']:8.4f} ms"
                  f"  x{r['times_floor']:7.1f}", file=sys.stderr)
    return {"bundle": bundle_path, "backend": backend, "block": block, "config": cfg.to_dict(), "pos": pos,
            "window": window, "unroll": bundle.unroll, "runs": runs, "warmup": warmup, "rows": rows,
            "matmul_gflops": {"all_cores": rate / 1e9, "one_core": rate_1 / 1e9, "cores": cores},
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}}


def markdown(result: dict) -> str:
    """The README table: one row per graph, batches side by side."""
    batches = sorted({r["batch"] for r in result["rows"]})
    head = "| graph | " + " | ".join(f"batch {b}: ms (x floor)" for b in batches) + " | weights MB |"
    lines = [head, "|---|" + "---|" * (len(batches) + 1)]
    keys = list(dict.fromkeys((r["variant"], r["engine"]) for r in result["rows"]))
    for variant, engine in keys:
        cells = []
        for b in batches:
            r = next(r for r in result["rows"] if (r["variant"], r["engine"], r["batch"]) == (variant, engine, b))
            cells.append(f"{r['ms_median']:.3f} (x{r['times_floor']:.1f})")
        mb = next(r["weights_mb"] for r in result["rows"] if (r["variant"], r["engine"]) == (variant, engine))
        lines.append(f"| `{variant}` ({engine}) | " + " | ".join(cells) + f" | {mb:.1f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--block", type=int, default=None)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=None, help="comma list (default: every graph in the bundle)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    result = measure(a.bundle, a.backend, [int(b) for b in a.batch.split(",")], a.block, a.runs, a.warmup,
                     a.variants.split(",") if a.variants else None)
    print(json.dumps(result, indent=1))
    print(markdown(result), file=sys.stderr)
    if a.json:
        write_json(a.json, result)


if __name__ == "__main__":
    main()
