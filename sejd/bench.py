"""`sejd bench`: every decoder side by side in one run, with warm-up and the median of several runs.

Decoders: `reference` (ml-tarflow's own loop, PyTorch), `sequential` (our fastest exact path on the
backend: host-driven steps or the one-call `sequential_loop`, whichever is faster), `ujd`, `sjd`,
`gs-jacobi`, and `auto` (the bundle's tuned plan.json, when there is one). Quality is measured
against exact sequential decoding from the same noise.

`forward` is not a decoder: one density evaluation of the batch (image -> z, the model's forward pass on
the same backend), i.e. the arithmetic of exact decoding done in parallel. Every decoder's time is also
reported as a multiple of it: how far decoding is from that floor.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from sejd.metrics import psnr_db
from sejd.request import seeded_labels, seeded_noise
from sejd.runtime.plan import TIMING_ONLY, Plan, named_plan
from sejd.runtime.runner import peak_rss_bytes
from sejd.runtime.sampler import sample
from sejd.source import Session

DECODERS = ("forward", "reference", "sequential", "ujd", "sjd", "gs-jacobi", "auto")


def _time(fn, runs: int, warmup: int):
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def _sequential_loop_plan(n: int):
    plan = named_plan("sequential", n)
    for b in plan.blocks:
        b.variant = "loop"
    plan.name = "sequential[loop]"
    return plan


def forward_call(src: Session, images: torch.Tensor, labels):
    """One density evaluation of `images`, as (callable, what runs it): the bundle's `forward` graph on
    ONNX Runtime's CPU provider, else the fp32 PyTorch model where the runners keep it (its device)."""
    sessions = getattr(src.runners[0], "sessions", None) if src.runners else None
    if sessions is not None and src.bundle is not None and "forward" in src.bundle.variants():
        import numpy as np

        session = sessions.get("forward")
        feeds = {"image": images.numpy()}
        if src.model.config.num_classes:
            feeds["labels"] = (labels if labels is not None else torch.full((len(images),), -1)).numpy().astype(np.int64)
        return (lambda: session.run(None, feeds)), f"forward graph ({src.backend})"
    model = getattr(src.runners[0], "model", src.model) if src.runners else src.model
    device = next(model.parameters()).device
    images, labels = images.to(device), None if labels is None else labels.to(device)

    def run():
        with torch.no_grad():
            out = model(images, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return run, f"model.forward (PyTorch fp32, {device.type})"


def bench(src: Session, batches=(1, 16), decoders=DECODERS, runs: int = 5, warmup: int = 1, seed: int = 0,
          guidance: float = 0.0, log=print) -> dict:
    """`decoders`: names from DECODERS, or Plan objects (measured under their names)."""
    model, cfg = src.model, src.model.config
    nblocks = cfg.num_blocks
    out_runs = []
    for batch in batches:
        noise = seeded_noise(batch, seed, cfg.num_tokens, cfg.token_dim)
        labels = seeded_labels(batch, None, cfg.num_classes)

        def run(plan, runners=src.runners):
            return sample(model, noise, labels=labels, plan=plan, guidance=guidance, runners=runners, progress=False)

        measured = {}
        forward_s = None
        for name in decoders:
            if name == "forward":
                # any images do: the cost of a density evaluation does not depend on the values; with
                # guidance the decoders run a cond and an uncond row per sample, so the forward does too
                images, rows_labels = src.model.unpatchify(noise), labels
                if guidance > 0:
                    images = torch.cat([images, images])
                    if labels is not None:
                        rows_labels = torch.cat([labels, torch.full_like(labels, -1)])
                call, what = forward_call(src, images, rows_labels)
                times, _ = _time(call, runs, warmup)
                forward_s = statistics.median(times)
                log(f"  batch {batch:>3} {'forward':<18} {forward_s * 1e3:10.2f} ms")
                out_runs.append({"decoder": "forward", "variant": "density evaluation", "runs_on": what,
                                 "rows": len(images), "backend": src.backend, "batch": batch,
                                 "precision": "fp32" if what.startswith("model.forward") else src.precision,
                                 "seconds_median": forward_s, "seconds_all": times})
                continue
            if name == "auto":
                if not src.tuned_plans():
                    log("  auto: skipped (no tuned plan in the bundle; run `sejd tune`)")
                    continue
                candidates = {"auto": src.plan("auto", batch)}
            elif name == "sequential":
                candidates = {"sequential[host]": "sequential"}
                if src.runners is not None:
                    candidates["sequential[loop]"] = _sequential_loop_plan(nblocks)
            elif isinstance(name, Plan):  # a plan object (e.g. fixed iteration counts), under its own name
                name, candidates = name.name, {name.name: name}
            else:
                candidates = {name: name}
            best = None
            for label, plan in candidates.items():
                runners = None if name == "reference" else src.runners
                times, result = _time(lambda: run(plan, runners), runs, warmup)
                entry = (statistics.median(times), times, result, label)
                log(f"  batch {batch:>3} {label:<18} {entry[0] * 1e3:10.2f} ms")
                if best is None or entry[0] < best[0]:
                    best = entry
            measured[name] = best
        if not measured:  # only the forward row: no decoder to compare with exact decoding
            continue
        exact = measured["sequential"][2].images if "sequential" in measured else run("sequential").images
        ref_s = measured["reference"][0] if "reference" in measured else None
        seq_s = measured["sequential"][0] if "sequential" in measured else None
        for name, (median, times, result, label) in measured.items():
            stats = result.stats
            out_runs.append({
                "decoder": name, "variant": label, "backend": "torch" if name == "reference" else src.backend,
                "precision": "fp32" if name == "reference" else src.precision,
                "batch": batch, "seconds_median": median, "seconds_all": times,
                "speedup_vs_reference": ref_s / median if ref_s else None,
                "speedup_vs_sequential": seq_s / median if seq_s else None,
                "multiple_of_forward": median / forward_s if forward_s else None,
                "psnr_db_vs_sequential": psnr_db(result.images, exact),
                "max_abs_vs_sequential": float((result.images - exact).abs().max()),
                "iterations_per_block": [b.iterations for b in stats.blocks],
                "seconds_per_block": [b.seconds for b in stats.blocks],
                "blocks_in_sampling_order": [b.block for b in stats.blocks],
                "residuals_per_block": [b.residuals for b in stats.blocks],
                "timing_only": TIMING_ONLY in stats.plan,  # fixed iteration counts: not converged by design
                "peak_rss_bytes": stats.peak_rss_bytes,  # of the process, when this decoder's runs ended
            })
        for r in out_runs:
            if r["decoder"] == "forward" and r["batch"] == batch:
                r["speedup_vs_reference"] = ref_s / forward_s if ref_s else None
                r["speedup_vs_sequential"] = seq_s / forward_s if seq_s else None
                r["multiple_of_forward"] = 1.0
    return {"runs": out_runs, "runs_per_measurement": runs, "warmup": warmup, "seed": seed, "guidance": guidance,
            "config": cfg.to_dict(), "machine": machine_info(), "peak_rss_bytes": peak_rss_bytes(),
            "single_token_steps": step_path(src)}


def step_path(src: Session) -> str:
    """What ran single tokens: the native CPU step (ort-cpu with a C compiler) or the backend's own."""
    if any(hasattr(type(r), "native") for r in src.runners or ()):  # the class: the property packs a block
        from sejd.engines import native

        return f"native CPU step ({native.threads()} threads)"
    return "the backend's step graphs" if src.runners else "PyTorch"


def machine_info() -> dict:
    import onnxruntime

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def table(result: dict) -> str:
    rows = [f"{'batch':>5} {'decoder':<10} {'variant':<18} {'median ms':>10} {'vs ref':>7} {'vs seq':>7} "
            f"{'x fwd':>6} {'PSNR dB':>8}  iterations per block (sampling order)"]
    for r in result["runs"]:
        f = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
        p = r.get("psnr_db_vs_sequential")
        quality = "-" if p is None else "exact" if p == float("inf") or p > 100 else f"{p:.1f}"
        fwd = r.get("multiple_of_forward")
        rows.append(f"{r['batch']:>5} {r['decoder']:<10} {r['variant']:<18} {r['seconds_median'] * 1e3:>10.1f} "
                    f"{f(r.get('speedup_vs_reference')):>7} {f(r.get('speedup_vs_sequential')):>7} "
                    f"{f'{fwd:.1f}' if fwd else '-':>6} {quality:>8}  {r.get('iterations_per_block', '')}"
                    + (f"  {TIMING_ONLY}" if r.get("timing_only") else ""))
    rows.append(f"peak resident memory: {result['peak_rss_bytes'] / 2**30:.2f} GiB" if "peak_rss_bytes" in result else "")
    if "single_token_steps" in result:
        rows.append(f"single-token steps: {result['single_token_steps']}")
    return "\n".join(rows).rstrip()


def plot(result: dict, path) -> None:
    """Residual against iteration per block, and time per block, for each decoder (largest batch)."""
    from sejd.extras import require

    matplotlib = require("matplotlib", "the benchmark plot (--plot)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sejd.files import atomic_write

    batch = max(r["batch"] for r in result["runs"])
    runs = [r for r in result["runs"] if r["batch"] == batch and "seconds_per_block" in r]  # decoders, not forward
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        if r["decoder"] not in ("ujd", "auto", "sjd"):
            continue
        for order, (blk, res) in enumerate(zip(r["blocks_in_sampling_order"], r["residuals_per_block"])):
            if len(res) > 1:
                ax1.semilogy(range(1, len(res) + 1), res, marker=".", label=f"{r['decoder']} block {blk} (#{order})")
    ax1.set_xlabel("Jacobi iteration")
    ax1.set_ylabel("max |x_t - x_(t-1)|")
    ax1.set_title(f"Jacobi convergence per block (batch {batch})")
    ax1.legend(fontsize=7)
    names = [r["variant"] for r in runs]
    bottom = [0.0] * len(runs)
    nblocks = len(runs[0]["seconds_per_block"])
    for order in range(nblocks):
        secs = [1e3 * r["seconds_per_block"][order] for r in runs]
        ax2.bar(names, secs, bottom=bottom, label=f"sampling block #{order} (blocks[{runs[0]['blocks_in_sampling_order'][order]}])")
        bottom = [b + s for b, s in zip(bottom, secs)]
    ax2.set_ylabel("ms")
    ax2.set_title(f"time per block (batch {batch})")
    ax2.tick_params(axis="x", rotation=30)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


__all__ = ["bench", "table", "plot", "DECODERS"]
