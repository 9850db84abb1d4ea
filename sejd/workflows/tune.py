"""`sejd tune`: measure, on this backend and batch, which decoder and parameters invert each block
fastest while the samples keep PSNR >= a target against exact sequential decoding.

The target is quality, not tau. Search (each step is a real sampling run, timed per block):

0. Exact baseline: every exact path of every block is timed (single-token steps driven from the host,
   which on ort-cpu run in the native step or a step graph, and the one-call sequential block), and
   each block keeps its fastest. Every sequential block below is that block's fastest exact path, so a
   Jacobi candidate always competes with exact decoding at its best.
1. Uniform plans: the exact baseline, and for every tau on the grid every Jacobi block at that tau,
   with the first sampling block exact, Jacobi, or GS-Jacobi. The fastest plan that meets
   target + margin on the calibration noise is the start.
2. Per block: a Jacobi block tries its exact path instead; then one block's tau at a time is
   loosened while quality holds and time drops.
3. Variants: each Jacobi block is timed host-driven, host-driven with a frozen converged prefix,
   in chunks of the unrolled `jacobi_k`, and as one `jacobi_loop` call; each block keeps its fastest
   variant (and quality is re-checked).
4. Hold-out: the plan is verified on noise seeds never used above; if it misses the target, every
   tau is tightened one grid step and it is verified again.
5. Head-to-head: the plan against every named plan that reaches the target on the calibration and
   hold-out noise (exact `sequential` always), in interleaved rounds (A B C, B C A, ...): the fastest
   by median becomes `auto`. Stages 0-3 compare runs taken at different moments; this is the one
   comparison a burst of load on a shared machine cannot tilt, so `auto` is never slower than the
   fastest named plan that reaches the target, as measured here.

plan.json records the chosen plan, every measurement behind it, the head-to-head's rounds, which path
ran single tokens, and pins the bundle's manifest.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import statistics
import time
from pathlib import Path

import torch

from sejd.core.errors import PlanError
from sejd.core.files import output_file, write_json
from sejd.runtime.plan import EXTRA_PLANS, NAMED_PLANS, BlockPlan, Plan, named_plan
from sejd.runtime.request import seeded_labels, seeded_noise, seeded_text
from sejd.runtime.sampler import sample
from sejd.workflows.quality import quality_db
from sejd.workflows.source import Session

TAU_GRID = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
HOLDOUT_SEEDS = (1000, 1001)  # never used for calibration (calibration seeds count up from 0)
MARGIN_DB = 1.0  # calibration must clear the target by this much; the hold-out must clear the target
PRUNE = 1.5  # a uniform candidate this much slower than the best so far ends its tau sweep
ROUNDS = 7  # interleaved rounds of the head-to-head (each runs every candidate once, the order rotating)


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
                 calib_seeds=(0,), holdout_seeds=HOLDOUT_SEEDS, repeats: int = 3, log=print, text=None):
        self.src, self.model, self.batch, self.target = src, src.model, batch, target_db
        # a STARFlow is conditioned on text, not labels: the user's embeddings (rows used in turn), else seeded
        # stand-ins; its samples are latents, judged by quality_db's latent PSNR
        self.starflow = hasattr(self.model.config, "text_block")
        self.text = text
        self.taus, self.guidance, self.repeats, self.log = tuple(sorted(taus, reverse=True)), guidance, repeats, log
        self.nblocks = self.model.config.num_blocks
        self.first = self.nblocks - 1  # blocks[-1] is applied first at sampling time
        self.calib = [self._noise(s) for s in calib_seeds]
        self.holdout = [self._noise(s) for s in holdout_seeds]
        self.trials: list[Trial] = []
        self.unroll = src.bundle.unroll if src.bundle is not None else 8
        # the exact paths a block can take: single-token steps driven from the host (native step or step
        # graph on ort-cpu) or the block's sequential inversion as one call, where a runner has one (a path
        # that would fall back to the host is not timed: same result, no gain)
        self.exact_variants = ("host", "loop") if self.one_call("sequential_loop") else ("host",)
        self.exact = [BlockPlan("sequential") for _ in range(self.nblocks)]  # each block's fastest, once timed

    def one_call(self, op: str, k: int | None = None) -> bool:
        """Whether block k's runner (any block's, for None) runs `op` as one engine call (BlockRunner.one_call)."""
        runners = self.src.runners or []
        return any(op in r.one_call for r in (runners if k is None else runners[k:k + 1]))

    def sample(self, plan, noise, labels):
        """`labels`: a TarFlow's class labels, or a STARFlow's text embeddings (B, Lt, Dt) / None."""
        if self.starflow:
            return sample(self.model, noise, plan=plan, guidance=self.guidance, runners=self.src.runners,
                          text=labels, progress=False)
        return sample(self.model, noise, labels=labels, plan=plan, guidance=self.guidance, runners=self.src.runners,
                      progress=False)

    def _noise(self, seed):
        cfg = self.model.config
        noise = seeded_noise(self.batch, seed, cfg.num_tokens, cfg.token_dim)
        if self.starflow:
            labels = None if cfg.text_block is None else self._text(seed)
        else:
            labels = seeded_labels(self.batch, None, cfg.num_classes)
        return noise, labels, self.sample("sequential", noise, labels).images

    def _text(self, seed):
        cfg = self.model.config
        if self.text is None:
            return seeded_text(self.batch, seed, cfg.txt_size, cfg.txt_dim)
        rows = (seed * self.batch + torch.arange(self.batch)) % self.text.shape[0]
        return self.text[rows]

    def psnr(self, got, exact) -> float:
        return quality_db(self.model, got, exact)

    def run(self, plan: Plan, sets=None) -> Trial:
        """Quality on every noise set; time = the fastest of `repeats` runs on the first set."""
        sets = sets or self.calib
        psnrs, best = [], None
        for i, (noise, labels, exact) in enumerate(sets):
            for _ in range(self.repeats if i == 0 else 1):
                r = self.sample(plan, noise, labels)
                if i == 0 and (best is None or r.stats.seconds < best.stats.seconds):
                    best = r
            psnrs.append(self.psnr(r.images, exact))
        by_block = {b.block: b for b in best.stats.blocks}
        trial = Trial(copy.deepcopy(plan), best.stats.seconds, min(psnrs),
                      [by_block[k].seconds for k in range(self.nblocks)],
                      [by_block[k].iterations for k in range(self.nblocks)])
        self.trials.append(trial)
        return trial

    def ok(self, trial: Trial, margin=MARGIN_DB) -> bool:
        return trial.psnr_db >= self.target + margin

    def exact_baseline(self) -> Trial:
        """Every exact path of every block timed; each block keeps its fastest (`self.exact`), and the plan
        of those is the baseline every Jacobi candidate has to beat."""
        trials = {}
        for variant in self.exact_variants:
            trials[variant] = self.run(Plan("auto", [BlockPlan("sequential", variant=variant)
                                                     for _ in range(self.nblocks)]))
            self.log(f"  exact, every block {variant:<5}        {trials[variant].seconds * 1e3:8.1f} ms  "
                     f"per block {[round(s * 1e3, 1) for s in trials[variant].block_seconds]} ms")
        for k in range(self.nblocks):
            fastest = min(trials, key=lambda v: trials[v].block_seconds[k])
            self.exact[k] = BlockPlan("sequential", variant=fastest)
        if len({b.variant for b in self.exact}) == 1:
            return trials[self.exact[0].variant]
        t = self.run(Plan("auto", self.exact_blocks()))
        self.log(f"  exact, fastest path per block {[b.variant for b in self.exact]} {t.seconds * 1e3:8.1f} ms")
        return t

    def exact_block(self, k: int) -> BlockPlan:
        return copy.deepcopy(self.exact[k])

    def exact_blocks(self) -> list[BlockPlan]:
        return [self.exact_block(k) for k in range(self.nblocks)]

    def uniform(self, tau: float, first: str) -> Plan:
        blocks = [BlockPlan("jacobi", tau=tau) for _ in range(self.nblocks)]
        if first == "sequential":
            blocks[self.first] = self.exact_block(self.first)
        elif first.startswith("gs-jacobi"):
            blocks[self.first] = BlockPlan("gs-jacobi", tau=tau, segments=int(first.split(":")[1]))
        return Plan("auto", blocks)

    def search_uniform(self, best: Trial) -> Trial:
        """`best`: the exact baseline, always a candidate (on some hardware and batch sizes the fastest)."""
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
                if t.seconds > PRUNE * best.seconds:
                    break  # already well behind the best, and a smaller tau only adds iterations
        return best

    def per_block_decoder(self, best: Trial) -> Trial:
        """Each Jacobi block tries its fastest exact path instead: a block that needs many iterations can
        cost more than its steps, depending on batch size and hardware."""
        for k in range(self.nblocks):
            if best.plan.blocks[k].decoder == "sequential":
                continue
            plan = copy.deepcopy(best.plan)
            plan.blocks[k] = self.exact_block(k)
            t = self.run(plan)
            self.log(f"  block {k} exact ({plan.blocks[k].variant}) instead of {best.plan.blocks[k].decoder}: {t.seconds * 1e3:8.1f} ms "
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
        """Every variant of each Jacobi block (exact blocks already run their fastest path)."""
        options = {"jacobi": [dict(variant="host"), dict(variant="host", freeze=True),
                              dict(variant="host", per_sample=True),
                              dict(variant="chunk", chunk=self.unroll), dict(variant="loop")],
                   "gs-jacobi": [dict(variant="host")]}
        if not any(b.decoder in options for b in best.plan.blocks):
            return best
        # a variant that needs a one-call engine the block's runner lacks would run the host path: not timed
        needs = {"chunk": "jacobi_chunk", "loop": "jacobi_loop"}
        timings: dict[int, list] = {k: [] for k in range(self.nblocks)}
        kinds = max(len(v) for v in options.values())
        for i in range(kinds):
            plan, tried = copy.deepcopy(best.plan), False
            for k, b in enumerate(plan.blocks):
                if b.decoder not in options:
                    continue
                option = options[b.decoder][i] if i < len(options[b.decoder]) else {}
                if option.get("variant") in needs and not self.one_call(needs[option["variant"]], k):
                    option = {}
                tried |= bool(option)
                for field, value in {"variant": "host", "freeze": False, "per_sample": False, **option}.items():
                    setattr(b, field, value)
            if not tried:
                if any(b.decoder == "jacobi" for b in plan.blocks):
                    self.log(f"  variants #{i}: {options['jacobi'][i]} not timed: no block's runner runs it as "
                             f"one call (export --variants all for the jacobi_k and Loop graphs)")
                continue
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

    def named_candidates(self) -> dict[str, Plan]:
        """The named plans as `sejd sample --plan NAME` runs them (exact decoding on each of its paths)."""
        plans = {}
        for name in NAMED_PLANS + (EXTRA_PLANS if self.starflow else ()):  # starflow: Apple's sampler
            if name == "sequential":
                for variant in self.exact_variants:
                    plan = named_plan(name, self.nblocks)
                    for b in plan.blocks:
                        b.variant = variant
                    plans[f"sequential[{variant}]"] = plan
            else:
                plans[name] = named_plan(name, self.nblocks)
        return plans

    def quality(self, plan: Plan) -> float:
        """The lowest PSNR over the calibration and hold-out noise."""
        return min(self.psnr(self.sample(plan, noise, labels).images, exact)
                   for noise, labels, exact in self.calib + self.holdout)

    def head_to_head(self, tuned: Plan, rounds: int = ROUNDS) -> tuple[str, Plan, dict]:
        """The tuned plan against every named plan that reaches the target, `rounds` interleaved rounds on
        the first calibration noise (one warm-up run each first): (winner, its plan, the record)."""
        candidates, psnrs = {"tuned": tuned}, {}
        for name, plan in self.named_candidates().items():
            psnrs[name] = self.quality(plan)
            if psnrs[name] >= self.target:
                candidates[name] = plan
            else:
                self.log(f"  head-to-head: {name} left out ({psnrs[name]:.1f} dB < {self.target} dB)")
        noise, labels, _ = self.calib[0]
        names = list(candidates)
        for name in names:
            self.sample(candidates[name], noise, labels)  # warm-up
        times = {name: [] for name in names}
        order_log = []
        for r in range(max(rounds, 1)):
            order = names[r % len(names):] + names[:r % len(names)]  # A B C, B C A, C A B, ...
            for name in order:
                t0 = time.perf_counter()
                self.sample(candidates[name], noise, labels)
                times[name].append(time.perf_counter() - t0)
            order_log.append(order)
        medians = {name: statistics.median(v) for name, v in times.items()}
        winner = min(names, key=lambda n: medians[n])  # ties go to the earlier name: the tuned plan first
        for name in names:
            self.log(f"  head-to-head {name:<18} median {medians[name] * 1e3:8.1f} ms  min {min(times[name]) * 1e3:8.1f} ms"
                     + ("  <- auto" if name == winner else ""))
        record = {"rounds": len(order_log), "order": order_log, "seconds": times, "median_seconds": medians,
                  "psnr_db": psnrs,
                  "left_out": sorted(n for n in psnrs if n not in candidates), "winner": winner}
        return winner, candidates[winner], record


def tune(src: Session, batch: int = 1, target_db: float = 40.0, taus=TAU_GRID, guidance: float = 0.0,
         out: str | Path | None = None, log=print, text=None) -> Plan:
    """`text`: a STARFlow's calibration text embeddings (n, Lt, Dt), used in turn (default: seeded stand-ins)."""
    if out is not None:
        output_file(out)  # a directory given as the plan file fails now, not after the search
    # quality is judged on at least 8 images for calibration and 16 for the hold-out
    calib = tuple(range(-(-8 // batch)))
    holdout_seeds = tuple(HOLDOUT_SEEDS[0] + i for i in range(-(-16 // batch)))
    tuner = Tuner(src, batch, target_db, taus, guidance, calib_seeds=calib, holdout_seeds=holdout_seeds, log=log,
                  text=text)
    path = src.single_token_path
    log(f"tune: batch {batch}, target {target_db} dB on {src.backend}; single tokens: {path}")
    best = tuner.search_uniform(tuner.exact_baseline())
    best = tuner.per_block_decoder(best)
    best = tuner.relax(best)
    best = tuner.variants(best)
    holdout = tuner.verify(best)
    winner, chosen, head_to_head = tuner.head_to_head(holdout.plan)
    plan = copy.deepcopy(chosen)
    plan.name = "auto"
    plan.meta = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bundle_manifest_sha256": src.bundle.manifest_sha256 if src.bundle is not None else None,
        "backend": src.backend, "batch": batch, "target_psnr_db": target_db, "guidance": guidance,
        "calibration": {"seconds": best.seconds, "psnr_db": best.psnr_db, "iterations": best.iterations,
                        "block_seconds": best.block_seconds},
        "holdout": {"psnr_db": holdout.psnr_db if winner == "tuned" else head_to_head["psnr_db"][winner],
                    "seeds": list(holdout_seeds), "images": len(holdout_seeds) * batch},
        "chosen": "the search's plan" if winner == "tuned" else f"named plan {winner} (faster in the head-to-head)",
        "head_to_head": head_to_head,
        "single_token_path": path,
        "calibration_seeds": list(calib),
        "trials": [t.to_dict() for t in tuner.trials],
    }
    if out is not None:
        write_json(out, plan.to_dict())
        if src.bundle is not None and Path(out).resolve() == (src.bundle.path / "plan.json").resolve():
            write_json(src.bundle.path / "plans" / f"batch-{batch}.json", plan.to_dict())
    return plan

