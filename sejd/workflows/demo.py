"""`make demo`: the main job on the bundled default model, end to end.

export -> build (ort-cpu) -> tune -> sample with the tuned plan -> check parity -> speed table -> PNG.
Everything lands in out/demo/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def step(title):
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="builtin:textures")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--batch", default="1,16", help="batch sizes for the speed table")
    p.add_argument("--runs", type=int, default=5, help="interleaved rounds of the speed table")
    a = p.parse_args(argv)

    from sejd.core.files import write_json
    from sejd.core.util import save_grid
    from sejd.engines.ort import build_ort
    from sejd.export.bundle import load_bundle
    from sejd.export.exporter import export_bundle
    from sejd.runtime.request import seeded_labels, seeded_noise
    from sejd.runtime.sampler import sample
    from sejd.workflows.bench import bench, plot, table
    from sejd.workflows.check import check_bundle
    from sejd.workflows.source import open_source
    from sejd.workflows.tune import tune

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in a.batch.split(",")]

    t = step(f"export {a.source} -> {out / 'bundle'}")
    bundle = export_bundle(a.source, out / "bundle", force=True)
    print(f"{len(bundle.manifest['graphs'])} graphs, {time.perf_counter() - t:.0f} s")

    t = step("build ort-cpu engines")
    build_ort(bundle, "ort-cpu")
    print(f"{time.perf_counter() - t:.0f} s")

    src = open_source(bundle.path, "ort-cpu")
    print(f"single tokens run in: {src.single_token_path}")
    for batch in batches:
        t = step(f"tune a plan for batch {batch} (PSNR >= 40 dB against exact sequential decoding)")
        plan = tune(src, batch=batch, target_db=40.0, out=bundle.path / "plan.json", log=lambda *x: None)
        for k, b in enumerate(plan.blocks):
            print(f"  blocks[{k}]: {b.decoder} [{b.variant}]" +
                  ("" if b.decoder == "sequential" else f" tau={b.tau}" + (" +frozen prefix" if b.freeze else "")))
        h2h = plan.meta["head_to_head"]
        print("  head-to-head (median of " + str(h2h["rounds"]) + " interleaved rounds): " + ", ".join(
            f"{name} {sec * 1e3:.1f} ms" for name, sec in sorted(h2h["median_seconds"].items(), key=lambda e: e[1])))
        print(f"  auto = {plan.meta['chosen']}; hold-out PSNR {plan.meta['holdout']['psnr_db']:.1f} dB; "
              f"{time.perf_counter() - t:.0f} s")

    t = step("sample 16 images with the tuned plan")
    src = open_source(bundle.path, "ort-cpu")
    cfg = src.model.config
    noise = seeded_noise(16, 0, cfg.num_tokens, cfg.token_dim)  # what `sejd sample -n 16 --seed 0` draws
    labels = seeded_labels(16, None, cfg.num_classes)
    result = sample(src.model, noise, labels=labels, plan=src.plan("auto", 16), runners=src.runners, progress=False)
    print(result.stats.table())
    grid = save_grid(result.images, out / "samples.png", scale=max(1, 128 // cfg.img_size))
    print(f"wrote {grid}")

    t = step("check: every graph against PyTorch, every plan end to end")
    report = check_bundle(load_bundle(bundle.path), "ort-cpu", plans=("sequential", "sjd", "auto"))
    failed = [c for c in report.checks if c.enforced and not c.passed]
    print("\n".join(c.line() for c in report.checks if not c.name.startswith("block")))
    print(report.summary().splitlines()[-1])
    write_json(out / "check.json", report.to_dict())

    t = step(f"speed table (batch {a.batch}, {a.runs} interleaved rounds)")
    result = bench(src, batches, runs=a.runs, warmup=1, log=lambda *x: None)
    print(table(result))
    write_json(out / "bench.json", result)
    plot(result, out / "bench.png")
    print(f"wrote {out / 'bench.json'}, {out / 'bench.png'}, {out / 'samples.png'}")
    if failed:
        print(f"demo: {len(failed)} checks failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
