"""Latency of one call of every graph variant on a built backend, at several batch sizes.

Warm-up calls first, then the median of --runs timed calls (all variants measured side by side in
one process). JSON on stdout and in --json; a table on stderr.

    python benchmarks/variant_latency.py /tmp/b --backend ort-cpu --batch 1,16 --json docs/latency.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

from sejd.bundle import load_bundle
from sejd.files import write_json
from sejd.engines.ort import OrtSessions
from sejd.export.contracts import contract, dummy_inputs


def graph_latency(sessions: OrtSessions, variant: str, block: int | None, batches, runs: int, warmup: int) -> list:
    """Median latency of one call of one graph per batch size: rows of variant, batch, ms_median, ms_all."""
    bundle = sessions.bundle
    c = contract(bundle.config, variant, bundle.unroll)
    sess = sessions.get(variant, None if variant == "forward" else block)
    rows = []
    for batch in batches:
        # jacobi_loop runs to its cap (tau = 0): T-1 iterations, the worst case
        feeds = dummy_inputs(c, bundle.config, batch=batch, window=8, tau=0.0)
        for _ in range(warmup):
            sess.run(None, feeds)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t0)
        rows.append({"variant": variant, "batch": batch, "ms_median": 1e3 * statistics.median(times),
                     "ms_all": [1e3 * t for t in times]})
        print(f"{variant:<16} batch {batch:>3}: {rows[-1]['ms_median']:9.3f} ms", file=sys.stderr)
    return rows


def measure(bundle_path: str, backend: str, batches: list[int], block: int | None, runs: int, warmup: int,
            variants=None) -> dict:
    """Every graph variant of one block (default: all the bundle has) on `backend`."""
    import onnxruntime

    bundle = load_bundle(bundle_path)
    cfg = bundle.config
    block = cfg.num_blocks - 2 if block is None else block  # a Jacobi block of the SJD plan
    sessions = OrtSessions(bundle, backend)
    rows = [row for variant in (variants or bundle.variants())
            for row in graph_latency(sessions, variant, block, batches, runs, warmup)]
    return {"bundle": bundle_path, "backend": backend, "block": block, "config": cfg.to_dict(),
            "unroll": bundle.unroll, "runs": runs, "warmup": warmup, "rows": rows,
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "onnxruntime": onnxruntime.__version__}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--backend", default="ort-cpu")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--block", type=int, default=None)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    result = measure(a.bundle, a.backend, [int(b) for b in a.batch.split(",")], a.block, a.runs, a.warmup)
    print(json.dumps(result, indent=1))
    if a.json:
        write_json(a.json, result)


if __name__ == "__main__":
    main()
