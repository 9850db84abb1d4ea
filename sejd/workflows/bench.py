"""`sejd bench`: every decoder side by side in one run, timed in interleaved rounds.

Decoders: `reference` (ml-tarflow's own loop, PyTorch), `sequential` (our fastest exact path on the
backend: host-driven steps or the one-call `sequential_loop`, whichever has the lower median), `ujd`,
`sjd`, `gs-jacobi`, and `auto` (the bundle's tuned plan.json, when there is one). Quality is measured
against exact sequential decoding from the same noise.

`forward` is not a decoder: one density evaluation of the batch (image -> z, the model's forward pass on
the same backend), i.e. the arithmetic of exact decoding done in parallel. Every decoder's time is also
reported as a multiple of it: how far decoding is from that floor.

Timing: every candidate (each decoder, both `sequential` candidates, the `forward` call) is prepared
once, then run once per round, in an order that rotates by one each round (A B C, B C A, C A B, ...):
`warmup` rounds are not recorded, then `runs` rounds are. A burst of load from elsewhere then lands on
one round of every candidate rather than on all runs of one. Each row reports the median, the minimum
and the spread, IQR / median (quartiles by `statistics.quantiles(method="inclusive")`); a row whose
spread exceeds 10% is `noisy`, and so is the run when the 1-minute load average exceeded the usable cores.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Callable

import torch

from sejd.core import machine
from sejd.runtime.plan import TIMING_ONLY, Plan, named_plan
from sejd.runtime.request import seeded_labels, seeded_noise, seeded_text
from sejd.runtime.runner import peak_rss_bytes
from sejd.runtime.sampler import sample
from sejd.workflows.quality import quality_db
from sejd.workflows.source import Session

DECODERS = ("forward", "reference", "starflow", "sequential", "ujd", "sjd", "gs-jacobi", "auto")
# a STARFlow has no density graph nor ml-tarflow loop; its baseline is Apple's sampler (the `starflow` plan),
# which a TarFlow does not take: each family skips the rows that are not its own
NOT_FOR = {"starflow": ("forward", "reference"), "tarflow": ("starflow",)}
NOISY_SPREAD = 0.10  # IQR / median above which a row's time is flagged
REFERENCE_PATH = "PyTorch (ml-tarflow loop)"


@dataclasses.dataclass
class Candidate:
    """One thing to time: a decoder's plan (or the forward call), ready to run."""

    decoder: str  # the row it may become (`sequential` has two candidates)
    label: str
    call: Callable[[], object]
    times: list[float] = dataclasses.field(default_factory=list)  # seconds, one per timed round
    result: object = None  # what the last timed round returned


def rounds(candidates: list[Candidate], runs: int, warmup: int) -> None:
    """`warmup` unrecorded rounds, then `runs` timed ones; each runs every candidate once, timed round i
    starting at candidate i (mod their number) and going on in order."""
    n = len(candidates)
    for r in range(-warmup, runs):
        for j in range(n):
            c = candidates[(r + j) % n]
            t0 = time.perf_counter()
            out = c.call()
            seconds = time.perf_counter() - t0
            if r >= 0:
                c.times.append(seconds)
                c.result = out


def timing(times: list[float]) -> dict:
    """A row's time fields from its per-round seconds (in round order)."""
    median = statistics.median(times)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    spread = (q3 - q1) / median if median > 0 else 0.0
    return {"seconds_median": median, "seconds_min": min(times), "seconds_iqr": q3 - q1, "spread": spread,
            "seconds_all": list(times), "noisy": spread > NOISY_SPREAD}


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
    """`decoders`: names from DECODERS, or Plan objects (measured under their names).

    Returns the rows (`runs`) and, among others, `warnings` (one line per cause: noisy rows, load) and
    `loaded` (the 1-minute load average, before or after the rounds, exceeded the usable cores)."""
    load_before, cores = machine.load_average(), machine.usable_cores()
    out_runs = []
    for batch in batches:
        out_runs += _bench_batch(src, batch, decoders, runs, warmup, seed, guidance, log)
    load_after = machine.load_average()
    warnings = []
    peak_load = max((la[0] for la in (load_before, load_after) if la is not None), default=None)
    loaded = peak_load is not None and peak_load > cores
    if loaded:
        warnings.append(f"the 1-minute load average reached {peak_load:.2f} on {cores} usable cores: other work "
                        "shared the CPUs, so times may be inflated")
    noisy = [r for r in out_runs if r["noisy"]]
    if noisy:
        warnings.append(f"{len(noisy)} row{'s' * (len(noisy) > 1)} spread over {NOISY_SPREAD:.0%} (IQR / median) between rounds: "
                        + ", ".join(f"batch {r['batch']} {r['variant']} {r['spread']:.0%}" for r in noisy)
                        + "; rerun with more --runs, on a quieter machine")
    for w in warnings:
        log(f"bench: warning: {w}")
    extra = {"usable_cores": cores, "load_average_before": load_before, "load_average_after": load_after}
    if any(hasattr(type(r), "native") for r in src.runners or ()):  # the class: the property packs a block
        from sejd.engines import native

        extra["native_step_threads"] = native.threads()
    return {"runs": out_runs, "runs_per_measurement": runs, "warmup": warmup, "rounds": "interleaved",
            "seed": seed, "guidance": guidance, "config": src.model.config.to_dict(),
            "machine": machine.machine_info(extra), "peak_rss_bytes": peak_rss_bytes(),
            "single_token_steps": src.single_token_path, "warnings": warnings, "loaded": loaded}


def _bench_batch(src: Session, batch: int, decoders, runs: int, warmup: int, seed: int, guidance: float, log):
    model, cfg = src.model, src.model.config
    family = "starflow" if hasattr(cfg, "text_block") else "tarflow"
    noise = seeded_noise(batch, seed, cfg.num_tokens, cfg.token_dim)
    if family == "starflow":  # seeded stand-in text (the service and `sejd sample` take the user's)
        labels, text = None, None if cfg.text_block is None else seeded_text(batch, seed, cfg.txt_size, cfg.txt_dim)
    else:
        labels, text = seeded_labels(batch, None, cfg.num_classes), None

    def run(plan, runners=src.runners):
        if family == "starflow":
            return sample(model, noise, plan=plan, guidance=guidance, runners=runners, text=text, progress=False)
        return sample(model, noise, labels=labels, plan=plan, guidance=guidance, runners=runners, progress=False)

    candidates, groups, forward = [], {}, None
    for name in decoders:
        if isinstance(name, str) and name in NOT_FOR[family]:
            continue
        if name == "forward":
            # any images do: the cost of a density evaluation does not depend on the values; with
            # guidance the decoders run a cond and an uncond row per sample, so the forward does too
            images, rows_labels = model.unpatchify(noise), labels
            if guidance > 0:
                images = torch.cat([images, images])
                if labels is not None:
                    rows_labels = torch.cat([labels, torch.full_like(labels, -1)])
            call, what = forward_call(src, images, rows_labels)
            forward = Candidate("forward", "density evaluation", call)
            forward_row = {"decoder": "forward", "variant": "density evaluation", "runs_on": what,
                           "rows": len(images), "backend": src.backend, "batch": batch,
                           "precision": "fp32" if what.startswith("model.forward") else src.precision}
            candidates.append(forward)
            continue
        if name == "auto":
            if not src.tuned_plans():
                log("  auto: skipped (no tuned plan in the bundle; run `sejd tune`)")
                continue
            plans = {"auto": src.plan("auto", batch)}
        elif name == "sequential":
            plans = {"sequential[host]": src.plan("sequential", batch)}
            if src.runners is not None:
                plans["sequential[loop]"] = _sequential_loop_plan(cfg.num_blocks)
        elif isinstance(name, Plan):  # a plan object (e.g. fixed iteration counts), under its own name
            name, plans = name.name, {name.name: name}
        else:
            plans = {name: src.plan(name, batch)}
        runners = None if name == "reference" else src.runners
        groups[name] = [Candidate(name, label, functools.partial(run, plan, runners)) for label, plan in plans.items()]
        candidates += groups[name]

    rounds(candidates, runs, warmup)
    for c in candidates:
        t = timing(c.times)
        log(f"  batch {batch:>3} {c.label:<18} {t['seconds_median'] * 1e3:10.2f} ms median, "
            f"{t['seconds_min'] * 1e3:.2f} min, spread {t['spread']:.0%}")

    out = [] if forward is None else [dict(forward_row, **timing(forward.times))]
    forward_s = None if forward is None else out[0]["seconds_median"]
    # the best of each decoder's candidates, by median
    measured = {name: min(group, key=lambda c: statistics.median(c.times)) for name, group in groups.items()}
    if not measured:  # only the forward row: no decoder to compare with exact decoding
        return out
    exact = measured["sequential"].result.images if "sequential" in measured else run("sequential").images
    medians = {name: statistics.median(c.times) for name, c in measured.items()}
    # the baseline: ml-tarflow's loop for a TarFlow, Apple's sampler for a STARFlow
    ref_s, seq_s = medians.get("reference" if family == "tarflow" else "starflow"), medians.get("sequential")
    path = src.single_token_path
    for name, c in measured.items():
        stats, median = c.result.stats, medians[name]
        out.append({
            "decoder": name, "variant": c.label, "backend": "torch" if name == "reference" else src.backend,
            "precision": "fp32" if name == "reference" else src.precision,
            "single_token_path": REFERENCE_PATH if name == "reference" else path,
            "batch": batch, **timing(c.times),
            "speedup_vs_reference": ref_s / median if ref_s else None,
            "speedup_vs_sequential": seq_s / median if seq_s else None,
            "multiple_of_forward": median / forward_s if forward_s else None,
            "psnr_db_vs_sequential": quality_db(model, c.result.images, exact),  # latent PSNR for a STARFlow
            "max_abs_vs_sequential": float((c.result.images - exact).abs().max()),
            "iterations_per_block": [b.iterations for b in stats.blocks],
            "seconds_per_block": [b.seconds for b in stats.blocks],
            "blocks_in_sampling_order": [b.block for b in stats.blocks],
            "residuals_per_block": [b.residuals for b in stats.blocks],
            "timing_only": TIMING_ONLY in stats.plan,  # fixed iteration counts: not converged by design
            "peak_rss_bytes": stats.peak_rss_bytes,  # of the process, when this decoder's last round ended
        })
    if forward is not None:
        out[0].update(speedup_vs_reference=ref_s / forward_s if ref_s else None,
                      speedup_vs_sequential=seq_s / forward_s if seq_s else None, multiple_of_forward=1.0)
    return out


def table(result: dict) -> str:
    """The runs as a table: median and min in ms, spread (IQR / median, `!` over 10%), speed-ups, quality;
    then peak memory, the single-token path and any warnings."""
    rows = [f"{'batch':>5} {'decoder':<18} {'median ms':>10} {'min ms':>9} {'spread':>7} {'vs ref':>7} {'vs seq':>7} "
            f"{'x fwd':>6} {'PSNR dB':>8}  iterations per block (sampling order)"]
    for r in result["runs"]:
        f = lambda v: f"{v:.2f}x" if v else "-"  # noqa: E731
        p = r.get("psnr_db_vs_sequential")
        quality = "-" if p is None else "exact" if p == float("inf") or p > 100 else f"{p:.1f}"
        fwd = r.get("multiple_of_forward")
        name = "forward" if r["decoder"] == "forward" else r["variant"]
        least = f"{r['seconds_min'] * 1e3:.1f}" if "seconds_min" in r else "-"  # JSON written before rounds
        spread = f"{r['spread']:.0%}{'!' if r['noisy'] else ' '}" if "spread" in r else "- "
        rows.append(f"{r['batch']:>5} {name:<18} {r['seconds_median'] * 1e3:>10.1f} {least:>9} {spread:>7} "
                    f"{f(r.get('speedup_vs_reference')):>7} {f(r.get('speedup_vs_sequential')):>7} "
                    f"{f'{fwd:.1f}' if fwd else '-':>6} {quality:>8}  "
                    + " ".join(str(i) for i in r.get("iterations_per_block", ()))
                    + (f"  {TIMING_ONLY}" if r.get("timing_only") else ""))
    if "warmup" in result:
        rows.append(f"{result['runs_per_measurement']} rounds after {result['warmup']} warm-up, candidates "
                    f"interleaved; spread = IQR / median, ! over {NOISY_SPREAD:.0%}")
    if "peak_rss_bytes" in result:
        rows.append(f"peak resident memory: {result['peak_rss_bytes'] / 2**30:.2f} GiB")
    if "single_token_steps" in result:
        rows.append(f"single-token steps: {result['single_token_steps']}")
    rows += [f"bench: warning: {w}" for w in result.get("warnings", ())]
    return "\n".join(r.rstrip() for r in rows)


def plot(result: dict, path) -> None:
    """Residual against iteration per block, and time per block, for each decoder (largest batch)."""
    from sejd.core.extras import require

    matplotlib = require("matplotlib", "the benchmark plot (--plot)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sejd.core.files import atomic_write

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
