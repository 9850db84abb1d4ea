"""The native CPU step with and without a competing CPU-bound process (issue: waits that spin and yield
instead of blocking let one preempted worker stall the others and burn the CPU quota).

Two measurements per batch size, each as a per-token time:

- `step`: one block's whole sequential inversion in the native step (`NativeBlock.sequential`, one C call
  for T-1 tokens), divided by T-1;
- `sample`: a whole `sejd.sample(..., plan="sequential")` on the ort-cpu runners, divided by
  num_blocks x (T-1): that plan steps token by token from Python (one native call per token, so the
  pool's workers go idle between calls), plus the sampler's own work.

Conditions alternate round by round (quiet, loaded, quiet, loaded, ...) so that a drift of the machine's
speed hits both alike; "loaded" runs one `python -c "while True: pass"` next to the measurement, started
before the round (and given a moment to be scheduled) and killed after it. Per condition: median and
minimum over the rounds, and loaded/quiet of the medians. JSON (--json FILE, else stdout) and a table on
stderr. Timings on a shared machine are indicative only: each round also records the CPU that other
processes took meanwhile (`background_cores`, from /proc/stat less this process and the competitor), so
that a "quiet" round that was not quiet shows.

    python benchmarks/step_under_load.py builtin:textures --batch 1,16 --rounds 7
    python benchmarks/step_under_load.py BUNDLE --threads 2 --json load.json

A checkpoint or builtin:NAME is exported first (only the `step_rows` graph, built for ort-cpu, into a
temporary folder): the ort-cpu runners need a bundle, and the native step replaces the graphs it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def open_bundle(source: str, scratch: Path):
    """The bundle at `source`, or `source` (checkpoint, builtin:NAME) exported into `scratch` and built."""
    from sejd.export.bundle import load_bundle
    from sejd.workflows.source import is_bundle

    if is_bundle(source):
        return load_bundle(source)
    from sejd.engines.ort import build_ort
    from sejd.export.exporter import export_bundle

    print(f"exporting {source} (step_rows only) to {scratch} ...", file=sys.stderr)
    bundle = export_bundle(source, scratch / "bundle", variants=["step_rows"], batch_max=64, show_progress=False)
    build_ort(bundle, "ort-cpu", show_progress=False)
    return load_bundle(scratch / "bundle")


def machine_busy_s() -> float | None:
    """CPU seconds all cores have been busy since boot (/proc/stat), or None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Competitor:
    """One CPU-bound process next to the measurement (the 'loaded' condition), killed on exit."""

    def __init__(self, on: bool):
        self.on, self.proc = on, None

    def __enter__(self):
        if self.on:
            self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.2)  # running, and seen by the scheduler as CPU-bound, before the timing starts
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def per_token_step(nb, z, caches, labels, temps, calls: int) -> float:
    """Seconds per token of one block's native sequential inversion (median of `calls` calls)."""
    T = z.shape[1]
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        nb.sequential(z, caches, labels, temps, None)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / (T - 1)


def per_token_sample(model, runners, noise, labels) -> float:
    """Seconds per token of a whole sequential `sejd.sample` (every block, T-1 tokens each)."""
    from sejd import sample

    cfg = model.config
    t0 = time.perf_counter()
    sample(model, noise, labels=labels, plan="sequential", runners=runners, progress=False)
    return (time.perf_counter() - t0) / (cfg.num_blocks * (cfg.num_tokens - 1))


def summary(values: list[float]) -> dict:
    return {"median_us": statistics.median(values) * 1e6, "min_us": min(values) * 1e6,
            "rounds_us": [v * 1e6 for v in values]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default="builtin:textures", help="bundle, checkpoint or builtin:NAME")
    p.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--rounds", type=int, default=7, help="rounds per condition (quiet and loaded alternate)")
    p.add_argument("--calls", type=int, default=5, help="sequential blocks timed per round (median taken)")
    p.add_argument("--threads", type=int, default=None, help="native step threads (default: usable cores)")
    p.add_argument("--block", type=int, default=1, help="the block timed by `step`")
    p.add_argument("--no-sample", action="store_true", help="time the native step only")
    p.add_argument("--json", default=None, help="write the JSON here (default: stdout)")
    a = p.parse_args()
    torch.set_num_threads(1)

    from sejd.engines import native
    from sejd.engines.ort import ort_runners

    if native.available() is not None:
        sys.exit(f"the native step is not available here: {native.available()}")
    with tempfile.TemporaryDirectory(prefix="sejd-step-under-load-") as tmp:
        bundle = open_bundle(a.source, Path(tmp))
        runners = None if a.no_sample else ort_runners(bundle, "ort-cpu")
        model = runners[0].model if runners else bundle.load_model()
        native.set_threads(a.threads)  # after ort_runners, which sets the default
        cfg = model.config
        T, D = cfg.num_tokens, cfg.token_dim
        nb = native.NativeBlock(model.blocks[a.block], T)
        rows, results = [], {}
        batches = [int(b) for b in a.batch.split(",")]
        setups = {}
        for batch in batches:
            g = np.random.default_rng(batch)
            z = g.standard_normal((batch, T, D)).astype(np.float32)
            caches = [np.zeros((batch, cfg.num_heads, T, cfg.head_dim), np.float32)
                      for _ in range(2 * cfg.layers_per_block)]
            labels = np.full(batch, -1, np.int64) if cfg.num_classes else None
            noise = torch.randn(batch, T, D, generator=torch.Generator().manual_seed(batch))
            sample_labels = torch.full((batch,), -1, dtype=torch.long) if cfg.num_classes else None
            setups[batch] = (z, caches, labels, np.ones(batch, np.float32), noise, sample_labels)
            per_token_step(nb, *setups[batch][:4], calls=2)  # warm: scratch, caches, packed weights
            if runners:
                per_token_sample(model, runners, noise, sample_labels)
        times = {(b, what, cond): [] for b in batches for what in ("step", "sample") for cond in ("quiet", "loaded")}
        background = {"quiet": [], "loaded": []}
        for r in range(2 * a.rounds):
            cond = ("quiet", "loaded")[r % 2]
            busy0, own0, children0 = machine_busy_s(), time.process_time(), os.times()
            wall0 = time.perf_counter()
            with Competitor(cond == "loaded"):
                for batch in batches:
                    z, caches, labels, temps, noise, sample_labels = setups[batch]
                    times[batch, "step", cond].append(per_token_step(nb, z, caches, labels, temps, a.calls))
                    if runners:
                        times[batch, "sample", cond].append(per_token_sample(model, runners, noise, sample_labels))
            busy1, children1 = machine_busy_s(), os.times()  # the competitor's CPU counts once it is reaped
            if busy0 is not None and busy1 is not None:
                ours = time.process_time() - own0 + (children1.children_user + children1.children_system
                                                     - children0.children_user - children0.children_system)
                background[cond].append(max(0.0, busy1 - busy0 - ours) / (time.perf_counter() - wall0))
            others = f", other processes took {background[cond][-1]:.2f} cores" if background[cond] else ""
            print(f"round {r // 2 + 1}/{a.rounds} {cond} done{others}", file=sys.stderr)
        for batch in batches:
            for what in ("step", "sample"):
                if not times[batch, what, "quiet"]:
                    continue
                quiet, loaded = summary(times[batch, what, "quiet"]), summary(times[batch, what, "loaded"])
                ratio = loaded["median_us"] / quiet["median_us"]
                rows.append({"batch": batch, "measure": what, "quiet": quiet, "loaded": loaded,
                             "loaded_over_quiet": ratio})
        results = {"source": a.source, "threads": native.threads(), "usable_cores": native.default_threads(),
                   "cpu_count": os.cpu_count(), "tokens": T, "blocks": cfg.num_blocks, "rounds": a.rounds,
                   "calls_per_round": a.calls, "competitor": "python -c 'while True: pass'",
                   "background_cores": {c: [round(v, 3) for v in vs] for c, vs in background.items()}, "rows": rows}
    print(f"\n{'batch':>5} {'measure':<7} {'quiet med/min us':>18} {'loaded med/min us':>19} {'loaded/quiet':>12}",
          file=sys.stderr)
    for row in rows:
        q, lo = row["quiet"], row["loaded"]
        print(f"{row['batch']:>5} {row['measure']:<7} {q['median_us']:9.1f}/{q['min_us']:<8.1f} "
              f"{lo['median_us']:9.1f}/{lo['min_us']:<9.1f} {row['loaded_over_quiet']:12.2f}", file=sys.stderr)
    for cond, values in background.items():
        if values:
            print(f"other processes during {cond} rounds: {statistics.median(values):.2f} cores (median; "
                  f"max {max(values):.2f}){' - not quiet' if cond == 'quiet' and max(values) > 0.2 else ''}",
                  file=sys.stderr)
    text = json.dumps(results, indent=1)
    if a.json:
        Path(a.json).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
