"""`sejd tune`: measure, on this backend and batch, which decoder and parameters invert each block
fastest while the samples keep PSNR >= a target against exact sequential decoding.

The target is quality, not tau. Search (each step is a real sampling run, timed per block):

1. Uniform plans: all sequential, and for every tau on the grid every Jacobi block at that tau, with
   the first sampling block sequential, Jacobi, or GS-Jacobi. The fastest plan that meets
   target + margin on the calibration noise is the start.
2. Per block: a Jacobi block tries sequential decoding instead; then one block's tau at a time is
   loosened while quality holds and time drops.
3. Variants: each Jacobi block is timed host-driven, host-driven with a frozen converged prefix,
   in chunks of the unrolled `jacobi_k`, and as one `jacobi_loop` call; sequential blocks as steps
   or one `sequential_loop` call; each block keeps its fastest variant (and quality is re-checked).
4. Hold-out: the plan is verified on noise seeds never used above; if it misses the target, every
   tau is tightened one grid step and it is verified again.

plan.json records the chosen plan and every measurement behind it, and pins the bundle's manifest.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
from pathlib import Path

from sejd.metrics import psnr_db
from sejd.errors import PlanError
from sejd.request import seeded_labels, seeded_noise
from sejd.runtime.plan import BlockPlan, Plan
from sejd.runtime.sampler import sample
from sejd.source import Session
from sejd.files import output_file, write_json

TAU_GRID = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
HOLDOUT_SEEDS = (1000, 1001)  # never used for calibration (calibration seeds count up from 0)
MARGIN_DB = 1.0  # calibration must clear the target by this much; the hold-out must clear the target


@dataclasses.dataclass
class Trial:
    plan: Plan
    seconds: float
    psnr_db: float
    block_seconds: list[float]  # in model block order
    iterations: list[int]  # in model block order

    def to_dict(self):
        return {"blocks": [dataclasses.asdict(b) for b in self.plan.blocks], "seconds": self.seconds,
                "psnr_db": self.psnr_db, "block_seconds": self.block_seconds, "iterations": self.iterations}


class Tuner:
    def __init__(self, src: Session, batch: int, target_db: float, taus=TAU_GRID, guidance: float = 0.0,
                 calib_seeds=(0,), holdout_seeds=HOLDOUT_SEEDS, repeats: int = 3, log=print):
        self.src, self.model, self.batch, self.target = src, src.model, batch, target_db
        self.taus, self.guidance, self.repeats, self.log = tuple(sorted(taus, reverse=True)), guidance, repeats, log
        self.nblocks = self.model.config.num_blocks
        self.first = self.nblocks - 1  # blocks[-1] is applied first at sampling time
        self.calib = [self._noise(s) for s in calib_seeds]
        self.holdout = [self._noise(s) for s in holdout_seeds]
        self.trials: list[Trial] = []
        self.unroll = src.bundle.unroll if src.bundle is not None else 8

    def _noise(self, seed):
        cfg = self.model.config
        noise = seeded_noise(self.batch, seed, cfg.num_tokens, cfg.token_dim)
        labels = seeded_labels(self.batch, None, cfg.num_classes)
        exact = sample(self.model, noise, labels=labels, plan="sequential", guidance=self.guidance,
                       runners=self.src.runners, progress=False).images
        return noise, labels, exact

    def run(self, plan: Plan, sets=None) -> Trial:
        """Quality on every noise set; time = the fastest of `repeats` runs on the first set."""
        sets = sets or self.calib
        psnrs, best = [], None
        for i, (noise, labels, exact) in enumerate(sets):
            for _ in range(self.repeats if i == 0 else 1):
                r = sample(self.model, noise, labels=labels, plan=plan, guidance=self.guidance,
                           runners=self.src.runners, progress=False)
                if i == 0 and (best is None or r.stats.seconds < best.stats.seconds):
                    best = r
            psnrs.append(psnr_db(r.images, exact))
        by_block = {b.block: b for b in best.stats.blocks}
        trial = Trial(copy.deepcopy(plan), best.stats.seconds, min(psnrs),
                      [by_block[k].seconds for k in range(self.nblocks)],
                      [by_block[k].iterations for k in range(self.nblocks)])
        self.trials.append(trial)
        return trial

    def ok(self, trial: Trial, margin=MARGIN_DB) -> bool:
        return trial.psnr_db >= self.target + margin

    def uniform(self, tau: float, first: str) -> Plan:
        blocks = [BlockPlan("jacobi", tau=tau) for _ in range(self.nblocks)]
        if first == "sequential":
            blocks[self.first] = BlockPlan("sequential")
        elif first.startswith("gs-jacobi"):
            blocks[self.first] = BlockPlan("gs-jacobi", tau=tau, segments=int(first.split(":")[1]))
        return Plan("auto", blocks)

    def search_uniform(self) -> Trial:
        # exact decoding is always a candidate: on some hardware and batch sizes it is the fastest
        best = self.run(Plan("auto", [BlockPlan("sequential") for _ in range(self.nblocks)]))
        self.log(f"  all sequential                 {best.seconds * 1e3:8.1f} ms  exact")
        for first in ("jacobi", "sequential", "gs-jacobi:4", "gs-jacobi:16"):
            for tau in self.taus:
                t = self.run(self.uniform(tau, first))
                self.log(f"  uniform first={first:<12} tau={tau:<6} {t.seconds * 1e3:8.1f} ms  {t.psnr_db:6.1f} dB "
                         f"iterations {t.iterations}")
                if self.ok(t):
                    if best is None or t.seconds < best.seconds:
                        best = t
                    break  # smaller tau only costs more
                if first == "sequential" and t.psnr_db < self.target - 20:
                    break
        return best

    def per_block_decoder(self, best: Trial) -> Trial:
        """Each Jacobi block tries sequential decoding instead: a block that needs many iterations can
        cost more than its steps, depending on batch size and hardware."""
        for k in range(self.nblocks):
            if best.plan.blocks[k].decoder == "sequential":
                continue
            plan = copy.deepcopy(best.plan)
            plan.blocks[k] = BlockPlan("sequential")
            t = self.run(plan)
            self.log(f"  block {k} sequential instead of {best.plan.blocks[k].decoder}: {t.seconds * 1e3:8.1f} ms "
                     f"{t.psnr_db:6.1f} dB")
            if self.ok(t) and t.seconds < best.seconds:
                best = t
        return best

    def relax(self, best: Trial) -> Trial:
        improved = True
        while improved:
            improved = False
            for k in range(self.nblocks):
                b = best.plan.blocks[k]
                looser = [t for t in self.taus if t > b.tau]
                if b.decoder == "sequential" or not looser:
                    continue
                plan = copy.deepcopy(best.plan)
                plan.blocks[k].tau = min(looser)
                t = self.run(plan)
                self.log(f"  relax block {k} tau {b.tau} -> {plan.blocks[k].tau}: {t.seconds * 1e3:8.1f} ms "
                         f"{t.psnr_db:6.1f} dB")
                if self.ok(t) and t.seconds < best.seconds:
                    best, improved = t, True
        return best

    def variants(self, best: Trial) -> Trial:
        options = {"jacobi": [dict(variant="host"), dict(variant="host", freeze=True),
                              dict(variant="host", per_sample=True),
                              dict(variant="chunk", chunk=self.unroll), dict(variant="loop")],
                   "sequential": [dict(variant="host"), dict(variant="loop")],
                   "gs-jacobi": [dict(variant="host")]}
        if self.src.runners is None:  # PyTorch: no fused graphs, but the frozen prefix still pays
            options["sequential"] = [dict(variant="host")]
        timings: dict[int, list] = {k: [] for k in range(self.nblocks)}
        kinds = max(len(v) for v in options.values())
        for i in range(kinds):
            plan = copy.deepcopy(best.plan)
            for k, b in enumerate(plan.blocks):
                opts = options[b.decoder]
                defaults = {"variant": "host", "freeze": False, "per_sample": False}
                for field, value in {**defaults, **opts[min(i, len(opts) - 1)]}.items():
                    setattr(b, field, value)
            t = self.run(plan)
            names = [b.variant + ("+freeze" if b.freeze else "") + ("+per-sample" if b.per_sample else "")
                     for b in plan.blocks]
            self.log(f"  variants #{i}: {names} {t.seconds * 1e3:8.1f} ms {t.psnr_db:6.1f} dB")
            for k in range(self.nblocks):
                timings[k].append((t.block_seconds[k], plan.blocks[k]))
        plan = copy.deepcopy(best.plan)
        for k in range(self.nblocks):
            plan.blocks[k] = copy.deepcopy(min(timings[k], key=lambda e: e[0])[1])
        t = self.run(plan)
        self.log(f"  fastest variant per block: {t.seconds * 1e3:8.1f} ms {t.psnr_db:6.1f} dB")
        return t if self.ok(t) and t.seconds <= best.seconds * 1.05 else best

    def verify(self, best: Trial) -> Trial:
        for _ in range(len(self.taus)):
            t = self.run(best.plan, sets=self.holdout)
            self.log(f"  hold-out: {t.psnr_db:6.1f} dB (target {self.target})")
            if t.psnr_db >= self.target:
                return t
            plan = copy.deepcopy(best.plan)
            for b in plan.blocks:
                tighter = [x for x in self.taus if x < b.tau]
                b.tau = max(tighter) if tighter else 0.0
            best = self.run(plan)
        raise PlanError("no plan met the PSNR target on the hold-out noise; use --plan sequential")


def tune(src: Session, batch: int = 1, target_db: float = 40.0, taus=TAU_GRID, guidance: float = 0.0,
         out: str | Path | None = None, log=print) -> Plan:
    if out is not None:
        output_file(out)  # a directory given as the plan file fails now, not after the search
    # quality is judged on at least 8 images for calibration and 16 for the hold-out
    calib = tuple(range(-(-8 // batch)))
    holdout_seeds = tuple(HOLDOUT_SEEDS[0] + i for i in range(-(-16 // batch)))
    tuner = Tuner(src, batch, target_db, taus, guidance, calib_seeds=calib, holdout_seeds=holdout_seeds, log=log)
    log(f"tune: batch {batch}, target {target_db} dB on {src.backend}")
    best = tuner.search_uniform()
    best = tuner.per_block_decoder(best)
    best = tuner.relax(best)
    best = tuner.variants(best)
    holdout = tuner.verify(best)
    plan = copy.deepcopy(holdout.plan)
    plan.name = "auto"
    plan.meta = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bundle_manifest_sha256": src.bundle.manifest_sha256 if src.bundle is not None else None,
        "backend": src.backend, "batch": batch, "target_psnr_db": target_db, "guidance": guidance,
        "calibration": {"seconds": best.seconds, "psnr_db": best.psnr_db, "iterations": best.iterations,
                        "block_seconds": best.block_seconds},
        "holdout": {"psnr_db": holdout.psnr_db, "seeds": list(holdout_seeds), "images": len(holdout_seeds) * batch},
        "calibration_seeds": list(calib),
        "trials": [t.to_dict() for t in tuner.trials],
    }
    if out is not None:
        write_json(out, plan.to_dict())
        if src.bundle is not None and Path(out).resolve() == (src.bundle.path / "plan.json").resolve():
            write_json(src.bundle.path / "plans" / f"batch-{batch}.json", plan.to_dict())
    return plan
