"""Does `sejd tune` give a plan a user can trust on their own machine? The user's commands, as a user runs
them, optionally under a competing CPU-bound process and a umask, then the verdict per batch size.

    python benchmarks/tuned_vs_named.py BUNDLE [--batch 1,16] [--runs 7] [--competitor] [--umask 002] [--json F]

Runs `sejd tune BUNDLE --batch N` for every N (writing the bundle's plans), then one
`sejd bench BUNDLE --batch ... --runs R` (interleaved rounds), each a child process; with `--competitor`
a `python -c "while True: pass"` runs throughout both. Reports per batch: the tuned plan's median, the
fastest named plan that reaches 40 dB against exact decoding (from the same bench run), their ratio
(the issue's target: <= 1.1), auto against ml-tarflow's loop, and which path ran single tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAMED = ("sequential", "ujd", "sjd", "gs-jacobi")
TARGET_DB = 40.0


def sejd(*args: str, umask: int | None) -> None:
    cmd = [str(Path(sys.executable).with_name("sejd")), *args]
    print("$ sejd " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def verdict(bench: dict) -> list[dict]:
    rows = []
    for batch in sorted({r["batch"] for r in bench["runs"]}):
        by = {r["decoder"]: r for r in bench["runs"] if r["batch"] == batch}
        named = [by[n] for n in NAMED if n in by and (by[n]["psnr_db_vs_sequential"] or 0) >= TARGET_DB]
        best = min(named, key=lambda r: r["seconds_median"])
        auto = by["auto"]
        rows.append({"batch": batch, "auto_ms": auto["seconds_median"] * 1e3, "auto_variant": auto["variant"],
                     "fastest_named": best["variant"], "fastest_named_ms": best["seconds_median"] * 1e3,
                     "auto_over_fastest_named": auto["seconds_median"] / best["seconds_median"],
                     "auto_vs_reference": auto.get("speedup_vs_reference"), "auto_psnr_db": auto["psnr_db_vs_sequential"],
                     "auto_spread": auto.get("spread"), "single_token_path": auto.get("single_token_path")})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--competitor", action="store_true", help="one CPU-bound process throughout")
    p.add_argument("--umask", default=None, help="octal umask for the sejd commands, e.g. 002")
    p.add_argument("--decoders", default=None, help="bench's --decoders (default: all; ml-tarflow's `reference` "
                                                    "loop takes minutes per round under a competing process)")
    p.add_argument("--skip-tune", action="store_true", help="bench the plans the bundle already has")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    umask = int(a.umask, 8) if a.umask else None
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if a.competitor else None
    t0 = time.time()
    try:
        for batch in [] if a.skip_tune else a.batch.split(","):
            sejd("tune", a.bundle, "--backend", "ort-cpu", "--batch", batch, umask=umask)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bench.json"
            sejd("bench", a.bundle, "--backend", "ort-cpu", "--batch", a.batch, "--runs", str(a.runs),
                 "--json", str(out), *(["--decoders", a.decoders] if a.decoders else []), umask=umask)
            bench = json.loads(out.read_text())
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    rows = verdict(bench)
    result = {"competitor": a.competitor, "umask": a.umask, "runs": a.runs, "wall_s": time.time() - t0,
              "verdict": rows, "bench_warnings": bench.get("warnings"), "machine": bench.get("machine"),
              "bench": bench}
    for r in rows:
        print(f"batch {r['batch']:>3}: auto ({r['auto_variant']}) {r['auto_ms']:.1f} ms, fastest named plan at "
              f">= {TARGET_DB:.0f} dB {r['fastest_named']} {r['fastest_named_ms']:.1f} ms: "
              f"{r['auto_over_fastest_named']:.2f}x; auto vs ml-tarflow's loop "
              f"{'-' if r['auto_vs_reference'] is None else format(r['auto_vs_reference'], '.1f') + 'x'}; "
              f"single tokens: {r['single_token_path']}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
