"""`sejd check`: prove that a backend's engines compute what the PyTorch reference computes.

1. Per graph: Polygraphy's Comparator runs the engine and a PyTorch reference runner on seeded inputs
   (batch 1 and 3, plain and CFG rows; `quick`: batch 1 plain and with CFG rows) and compares every
   output with the contract's absolute tolerance (or the user's `atol`/`rtol`); the report keeps
   max/mean error and the tolerance that would have passed. A failing graph's inputs and both runners'
   outputs are saved in Polygraphy's JSON format, with the `polygraphy run` command that reproduces it.
   ort-cpu's own single-token paths, the native step and the fused step graph (`step_fused`), are compared
   with the reference on the same inputs under the `step_rows` contract, as the runners call them.
2. End to end: each plan sampled on the engines against the same plan on PyTorch, and against exact
   sequential decoding on PyTorch from the same noise (PSNR on images mapped to [0, 1], max abs error).

Results are values: `CheckReport` is truthy only when every enforced check passed, and says what was
compared and what was not (graphs and plans skipped, feeds used).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shlex
import sys
from pathlib import Path

import numpy as np

from sejd.core.errors import SejdError
from sejd.core.util import progress
from sejd.engines import backends
from sejd.engines.ort_fused_step import ENGINE_VARIANTS, FUSED_VARIANT
from sejd.engines.polygraphy_runners import callable_runner
from sejd.export.bundle import Bundle
from sejd.export.contracts import (
    ALL_VARIANTS,
    BLOCK_VARIANTS,
    DEFAULT_UNROLL,
    TEXT_ONLY_VARIANTS,
    contract,
    dummy_inputs,
    is_starflow,
    tolerance,
)
from sejd.export.oracle import reference_outputs
from sejd.runtime.plan import NAMED_PLANS
from sejd.runtime.request import seeded_labels, seeded_noise
from sejd.workflows.quality import psnr_db, psnr_latents_db

PSNR_FLOOR_DB = 40.0  # the default (tuned) plan must stay >= 40 dB against exact decoding
PARITY_DB = 60.0  # an engine running a plan must match PyTorch running the same plan to round-off
# ... in reduced precision, to that precision's round-off. Measured on builtin:textures, H200 (docs/gpu/
# checks.json), same plan engine vs fp32 PyTorch: fp16 54.8-67.5 dB, bf16 33.1-46.4 dB, the lowest being
# GS-Jacobi at tau 0.5, whose stopping point on the first block moves with the round-off
PARITY_DB_BY_PRECISION = {"fp32": PARITY_DB, "fp16": 45.0, "bf16": 30.0}
END_TO_END_PLANS = ("sequential", "ujd", "sjd", "gs-jacobi")
STARFLOW_PLANS = ("starflow",)  # ml-starflow's own sampler: also checked by default on a STARFlow model
PLAN_CHOICES = NAMED_PLANS + STARFLOW_PLANS + ("auto",)
# STARFlow end to end: seeded text and unconditional text embeddings, sampled with this guidance weight (the
# text block's guided rows run too)
STARFLOW_CHECK_GUIDANCE = 2.0
LOOSE_TAU = 0.3  # jacobi_loop inputs that stop early; tau 0 runs it to the exact result (T-1 passes)
# quick mode: one pass per graph call, so a published-size model (T = 1024) checks in minutes on 2 cores;
# the chained graphs (jacobi_k, the loops) cost up to T-1 passes per input
QUICK_GRAPHS = ("step_present", "step_rows", "window", "jacobi", "forward", FUSED_VARIANT)
QUICK_PLANS = ("sjd",)


@dataclasses.dataclass
class CheckOptions:
    """What `sejd check` compares, and how (the CLI's options)."""
    atol: float | None = None  # None: each contract's tolerance at the engines' precision
    rtol: float | None = None  # None: 0 (the contracts are absolute)
    seed: int = 0
    plans: tuple | None = None  # None: the default plans (+ the tuned plan); (): graphs only
    graphs: str | None = None  # selectors (see select_graphs); None: all ("quick": QUICK_GRAPHS)
    quick: bool = False
    save_failures: str | Path | None = None  # where a failing graph's inputs/outputs go (None: a temp folder)
    polygraphy_log: bool = False  # show Polygraphy's own log
    show_progress: bool = True


@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    figures: dict
    enforced: bool = True  # informational checks are reported but do not fail the report
    reproduce: str | None = None  # the command that reproduces a failing graph outside sejd
    saved_in: str | None = None  # the folder holding a failing graph's inputs and outputs

    def line(self) -> str:
        fig = ", ".join(f"{k}={_fmt(v)}" for k, v in self.figures.items() if not isinstance(v, (dict, list)))
        status = ("PASS" if self.passed else "FAIL") if self.enforced else ("info" if self.passed else "low ")
        return f"{status}  {self.name}: {fig}" + (f"\n      reproduce: {self.reproduce}" if self.reproduce else "")


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


@dataclasses.dataclass
class CheckReport:
    backend: str
    checks: list[Check]
    scope: dict = dataclasses.field(default_factory=dict)  # what was and was not compared

    def __bool__(self):
        return all(c.passed or not c.enforced for c in self.checks)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "passed": bool(self), "scope": self.scope,
                "checks": [dataclasses.asdict(c) for c in self.checks]}

    def scope_lines(self) -> list[str]:
        s = self.scope
        if not s:
            return []
        feeds = ", ".join(f"batch {f['batch']}{' +guidance rows' if f['guidance_rows'] else ''} (input seed "
                          f"{f['input_seed']})" for f in s["feeds"])
        return [f"graphs compared: {len(s['graphs_compared'])} ({_by_variant(s['graphs_compared'])}); "
                f"skipped: {len(s['graphs_skipped'])} ({_by_variant(s['graphs_skipped'])})",
                f"feeds per graph: {feeds or 'none'}; tolerance: {s['tolerance']}",
                f"plans compared at batch {s['plan_batch']}, seed {s['seed']}: {_names(s['plans_compared'])}; "
                f"skipped: {_names(s['plans_skipped'])}"]

    def summary(self) -> str:
        enforced = [c for c in self.checks if c.enforced]
        failed = sum(not c.passed for c in enforced)
        return "\n".join([c.line() for c in self.checks] + self.scope_lines() +
                         [f"{len(enforced) - failed}/{len(enforced)} enforced checks passed on {self.backend} "
                          f"(+{len(self.checks) - len(enforced)} informational)"])


def _names(items) -> str:
    return ", ".join(items) if items else "none"


def _by_variant(names) -> str:
    """'block 0 step', 'block 1 step', 'forward' -> 'step (blocks 0, 1), forward'."""
    blocks: dict[str, list[str]] = {}
    for name in names:
        *where, variant = name.split(" ")
        blocks.setdefault(variant, []).extend(where[1:])
    return _names([f"{v} (blocks {', '.join(b)})" if b else v for v, b in blocks.items()])


def reference_runner(model, block, c):
    """The PyTorch reference (runner + decoders) evaluating a graph's contract."""
    return callable_runner(f"pytorch[{c.variant}]", c, lambda feeds: reference_outputs(model, block, c, feeds))


def feed_specs(seed: int = 0, quick: bool = False) -> list[dict]:
    """The inputs each graph is compared on: batch, guidance rows, the input seed, jacobi_loop's tau."""
    if quick:  # one seed: batch 1 plain and with guidance rows; jacobi_loop stops early
        return [{"batch": 1, "guidance_rows": rows, "input_seed": seed * 10 + 1, "tau": LOOSE_TAU}
                for rows in (False, True)]
    # two seeds; jacobi_loop once to convergence at a loose tau, once to the exact result
    return [{"batch": batch, "guidance_rows": rows, "input_seed": s * 10 + batch, "tau": LOOSE_TAU if s % 2 else 0.0}
            for s in (seed, seed + 1) for batch, rows in ((1, False), (3, False), (3, True))]


def graph_feeds(c, cfg, specs=None) -> list[dict]:
    feeds = []
    for f in specs or feed_specs():
        if c.variant == "forward" and f["guidance_rows"]:
            continue  # the forward pass has no guidance rows
        feeds.append(dummy_inputs(c, cfg, batch=f["batch"], cfg_rows=f["guidance_rows"], seed=f["input_seed"],
                                  tau=f["tau"]))
    return feeds


def graph_name(g: dict) -> str:
    return g["variant"] if g["block"] is None else f"block {g['block']} {g['variant']}"


def select_graphs(graphs: list[dict], spec: str | None, num_blocks: int) -> tuple[list[dict], list[dict]]:
    """(selected, skipped) graphs for `--graphs`: `all`, `none`, or a comma list of selectors, any of
    which selects a graph: `VARIANT` (e.g. `step_present`), `block:K` (every variant of block K) or
    `block:K:VARIANT`. Variants are the bundle's and the engines' own (ort-cpu's `step_fused`)."""
    if spec is None or spec == "all":
        return list(graphs), []
    if spec == "none":
        return [], list(graphs)
    wanted = [_selector(item.strip(), num_blocks) for item in spec.split(",")]
    chosen = [g for g in graphs if any((b is None or g["block"] == b) and (v is None or g["variant"] == v)
                                       for b, v in wanted)]
    return chosen, [g for g in graphs if g not in chosen]


def _selector(item: str, num_blocks: int) -> tuple[int | None, str | None]:
    expected = f"expected all, none, or a comma list of VARIANT, block:K or block:K:VARIANT " \
               f"(variants {', '.join(ALL_VARIANTS + ENGINE_VARIANTS)}; blocks 0..{num_blocks - 1})"
    parts = item.split(":")
    if len(parts) == 1 and item in ALL_VARIANTS + ENGINE_VARIANTS:
        return None, item
    if parts[0] == "block" and len(parts) in (2, 3):
        if not parts[1].isdigit() or int(parts[1]) >= num_blocks:
            raise SejdError(f"--graphs: {item!r} names block {parts[1]!r}; {expected}")
        if len(parts) == 3 and parts[2] not in BLOCK_VARIANTS + TEXT_ONLY_VARIANTS + ENGINE_VARIANTS:
            raise SejdError(f"--graphs: {item!r} names variant {parts[2]!r}; {expected}")
        return int(parts[1]), parts[2] if len(parts) == 3 else None
    raise SejdError(f"--graphs: cannot read {item!r}; {expected}")


def polygraphy_target(bundle: Bundle | None, backend: str, g: dict) -> list[str] | None:
    """The graph file and runner flags with which `polygraphy run` reruns graph `g` outside sejd: the
    built engine for ONNX Runtime backends, else the bundle's ONNX graph (on TensorRT for `tensorrt`,
    on ONNX Runtime for torch-cuda's modules). None without a bundle (nothing on disk to run)."""
    return None if bundle is None else backends.backend(backend)[0].polygraphy_args(bundle, g)


def save_failure(folder: Path, g: dict, feeds: list[dict], results, target: list[str] | None,
                 atol: float, rtol: float) -> str:
    """Write the failing graph's inputs, both runners' outputs and the reference's alone (Polygraphy's
    JSON format) under `folder`; return the command that reproduces the comparison, or where the
    files are when there is no graph file to rerun."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json

    from sejd.core.files import atomic_write

    where = folder / graph_name(g).replace(" ", "-")
    reference = RunResults()
    reference.append(results[0])  # the PyTorch runner's (name, iteration results)
    files = {"inputs": feeds, "outputs": results, "reference": reference}
    for stem, obj in files.items():
        with atomic_write(where / f"{stem}.json") as tmp:
            save_json(obj, tmp, description=f"{graph_name(g)} {stem}")
    if target is None:
        return f"inputs and outputs saved in {where}"
    return shlex.join(["polygraphy", "run", *target, "--load-inputs", str(where / "inputs.json"),
                       "--load-outputs", str(where / "reference.json"), "--atol", repr(atol), "--rtol", repr(rtol)])


def check_graphs(bundle: Bundle | None, backend: str, model, show_progress=True, precision: str = "fp32",
                 engine_runner=None, graphs=None, options: CheckOptions | None = None) -> list[Check]:
    """Polygraphy's Comparator: each graph on the engine vs the PyTorch reference, with the contract's
    tolerance at `precision` (or `options.atol`/`rtol`). `engine_runner(graph entry, contract)` makes the
    engine's Polygraphy runner (default: the backend's, over its built engines); `graphs`: a subset of the
    manifest's (entries with `block`, `variant`, and `file` when there is a bundle)."""
    from polygraphy.comparator import Comparator
    try:  # Polygraphy >= 0.50 names it SimpleCompareFunc; CompareFunc.simple is deprecated
        from polygraphy.comparator.compare import SimpleCompareFunc as simple_compare
    except ImportError:
        from polygraphy.comparator import CompareFunc
        simple_compare = CompareFunc.simple
    from polygraphy.logger import G_LOGGER

    options = options or CheckOptions(show_progress=show_progress)
    # sejd prints its own report; -v shows Polygraphy's log too
    G_LOGGER.module_severity = G_LOGGER.INFO if options.polygraphy_log else G_LOGGER.CRITICAL
    engine_runner = engine_runner or backends.backend(backend)[0].polygraphy_runner(bundle)
    cfg = model.config
    unroll = bundle.unroll if bundle is not None else DEFAULT_UNROLL
    specs = feed_specs(options.seed, options.quick)
    checks, folder = [], None
    graphs = bundle.manifest["graphs"] if graphs is None else graphs
    for g in progress(graphs, desc=f"check graphs on {backend}", enabled=show_progress):
        c = contract(cfg, g["variant"], unroll, block=g["block"])  # STARFlow: per block
        feeds = graph_feeds(c, cfg, specs)
        atol = tolerance(c, precision) if options.atol is None else options.atol
        rtol = options.rtol or 0.0
        with contextlib.redirect_stdout(sys.stderr):  # Polygraphy logs on stdout; results stay alone there
            results = Comparator.run([reference_runner(model, g["block"], c), engine_runner(g, c)], data_loader=feeds)
            accuracy = Comparator.compare_accuracy(results, compare_func=simple_compare(atol=atol, rtol=rtol),
                                                   fail_fast=False)
        max_err, mean_err = _errors(accuracy)
        built = "fp32" if c.variant == "forward" else precision  # forward is always built in fp32
        figures = {"atol": atol, "rtol": rtol, "tolerance_from": "contract" if options.atol is None else "--atol",
                   "precision": built, "max_abs": max(max_err.values()), "would_pass_atol": max(max_err.values()),
                   "per_output_max_abs": max_err, "per_output_mean_abs": mean_err, "inputs": len(feeds)}
        check = Check(graph_name(g), bool(accuracy), figures)
        if not check.passed:
            folder = folder or failure_folder(options)  # one per run: every failing graph of it goes there
            check.saved_in = str(folder)
            check.reproduce = save_failure(folder, g, feeds, results, polygraphy_target(bundle, backend, g), atol, rtol)
        checks.append(check)
    return checks


def _errors(accuracy) -> tuple[dict, dict]:
    """Per output, the largest max and mean absolute errors over every input."""
    max_err, mean_err = {}, {}
    for result in accuracy:  # one AccuracyResult per compare function: {runner pair: [per-iteration]}
        for iteration in (it for pair in result.values() for it in pair):
            for name, r in iteration.items():  # integer outputs compare exactly and give a plain bool
                max_err[name] = max(max_err.get(name, 0.0), float(getattr(r, "max_absdiff", 0.0 if r else math.inf)))
                mean_err[name] = max(mean_err.get(name, 0.0), float(getattr(r, "mean_absdiff", max_err[name])))
    return max_err, mean_err


def failure_folder(options: CheckOptions) -> Path:
    """Where a run's failing graphs are saved: `options.save_failures`, else a new temporary folder (named in
    the report). `options` is left as it came: the caller's next run gets a folder of its own."""
    if options.save_failures is not None:
        return Path(options.save_failures)
    import tempfile

    return Path(tempfile.mkdtemp(prefix="sejd-check-failures-"))


def check_end_to_end(src, model, plans=END_TO_END_PLANS, batch: int = 4, seed: int = 0, show_progress=True,
                     quality_plans=(), engine_model=None, precision: str = "fp32") -> list[Check]:
    """Every plan: engine == PyTorch running the same plan (enforced), and quality against exact
    sequential decoding (enforced >= 40 dB only for `quality_plans`, e.g. the bundle's tuned plan).
    `src`: the Session whose runners run the engines; `model`: the fp32 PyTorch reference."""
    from sejd.runtime.sampler import sample

    cfg = model.config
    noise = seeded_noise(batch, seed, cfg.num_tokens, cfg.token_dim)
    conditioning = sampling_conditioning(cfg, batch, seed)
    exact = sample(model, noise, plan="sequential", progress=False, **conditioning).images
    psnr = psnr_latents_db if is_starflow(cfg) else psnr_db  # STARFlow samples latents (unbounded)
    checks = []
    for plan in progress(plans, desc="check plans", enabled=show_progress):
        spec = src.plan("auto", batch) if plan == "auto" else plan
        r = sample(engine_model or model, noise, plan=spec, runners=src.runners, progress=False, **conditioning)
        # the same plan on PyTorch (exact decoding is that already)
        same = exact if plan == "sequential" else sample(model, noise, plan=spec, progress=False,
                                                         **conditioning).images
        iters = [b.iterations for b in r.stats.blocks]
        floor = PARITY_DB_BY_PRECISION[precision]
        checks.append(Check(f"plan {plan}: engine vs PyTorch, same plan", psnr(r.images, same) >= floor,
                            {"psnr_db": psnr(r.images, same), "psnr_floor_db": floor, "precision": precision,
                             "max_abs": float((r.images - same).abs().max()), "iterations_per_block": iters}))
        checks.append(Check(f"plan {plan}: engine vs exact sequential", psnr(r.images, exact) >= PSNR_FLOOR_DB,
                            {"psnr_db": psnr(r.images, exact), "psnr_floor_db": PSNR_FLOOR_DB,
                             "max_abs": float((r.images - exact).abs().max())},
                            enforced=plan in quality_plans or plan == "sequential"))
    return checks


def sampling_conditioning(cfg, batch: int, seed: int) -> dict:
    """The conditioning `sample` takes in the end-to-end checks: seeded labels (a conditional TarFlow), or for a
    STARFlow with text seeded text and unconditional text embeddings (batch, Lt, Dt) with guidance
    STARFLOW_CHECK_GUIDANCE (what a session passes its runners: `sample(..., text=, uncond_text=, guidance=)`)."""
    import torch

    if not is_starflow(cfg):
        return {"labels": seeded_labels(batch, None, cfg.num_classes)}
    if not cfg.txt_dim:
        return {}
    g = torch.Generator().manual_seed(seed + 1)
    text, null = (torch.randn(batch, cfg.txt_size, cfg.txt_dim, generator=g) for _ in range(2))
    return {"text": text, "uncond_text": null, "guidance": STARFLOW_CHECK_GUIDANCE}


def choose_plans(options: CheckOptions, tuned: bool, starflow: bool = False) -> tuple[list[str], list[str]]:
    """(compared, skipped) plans: the user's list, else the defaults plus the tuned plan when there is one
    (a STARFlow model's defaults add ml-starflow's own sampler, `starflow`)."""
    family = list(END_TO_END_PLANS) + (list(STARFLOW_PLANS) if starflow else [])
    available = family + (["auto"] if tuned else [])
    if options.plans is None:
        default = [p for p in QUICK_PLANS if p in available] if options.quick else family
        wanted = default + (["auto"] if tuned else [])  # the tuned plan is the default one: always checked
    else:
        wanted = list(dict.fromkeys(options.plans))
        unknown = [p for p in wanted if p not in PLAN_CHOICES]
        if unknown:
            raise SejdError(f"--plans: unknown plans {unknown}; expected none or a comma list of {list(PLAN_CHOICES)}")
        if "auto" in wanted and not tuned:
            raise SejdError("--plans auto is the bundle's tuned plan, and there is none: run `sejd tune` first")
    return wanted, [p for p in available if p not in wanted]


def graph_checks(src, model, options: CheckOptions, precision: str) -> tuple[list[Check], list[dict], list[dict]]:
    """The per-graph checks this backend supports, on the graphs `options.graphs` selects:
    (checks, compared graphs, skipped graphs)."""
    found = backends.backend(src.backend)[0]
    bundle, cfg = src.bundle, model.config
    if found.reference:  # no graphs to compare with itself
        return [], [], []
    every, runnable = found.checked_graphs(bundle, cfg)
    # torch-cuda compares the graph modules themselves, with the runners' model on the GPU, at its precision
    make_runner = found.polygraphy_runner(bundle, getattr(src.runners[0], "model", None), precision)
    spec = options.graphs if options.graphs is not None else (",".join(QUICK_GRAPHS) if options.quick else None)
    chosen, skipped = select_graphs(runnable, spec, cfg.num_blocks)
    skipped += [g for g in every if g not in runnable]
    checks = check_graphs(bundle, found.name, model, options.show_progress, precision, make_runner, chosen, options)
    return checks, chosen, skipped


def native_checks(src, model, options: CheckOptions, compared: list[dict]) -> list[Check]:
    """ort-cpu's native step (sejd/engines/native.py) against the PyTorch reference, per block, on the
    `step_rows` graph's inputs and contract tolerance: it replaces that graph on the CPU, so it answers to
    the same contract, and is checked for the blocks whose `step_rows` is (every block unless `--graphs`
    selects). Its sequential block is checked by the plans (`sequential` runs it)."""
    selected = {g["block"] for g in compared if g["variant"] == "step_rows"}
    runners = [(k, r) for k, r in enumerate(src.runners or ())  # the class: `native` packs the block when read
               if hasattr(type(r), "native") and (options.graphs is None or k in selected)]
    if not runners:
        return []
    cfg = model.config
    c = contract(cfg, "step_rows")
    atol = options.atol if options.atol is not None else c.atol
    all_feeds = graph_feeds(c, cfg, feed_specs(options.seed, options.quick))  # the same for every block
    checks = []
    for k, runner in progress(runners, desc="check native step", enabled=options.show_progress):
        worst, passed = {}, True
        for feeds in all_feeds:
            caches = [np.array(feeds[f"past.{n}"]) for n in runner.cache_names]
            batch, pos = feeds["x"].shape[0], int(feeds["pos"])
            guidance = feeds["guidance"] if feeds["temps"].shape[0] == 2 * batch else None
            xa, xb = runner.native.step(feeds["x"][:, 0], pos, caches, feeds.get("labels"), feeds["temps"], guidance)
            got = {"xa": xa[:, None], "xb": xb[:, None],
                   **{f"new.{n}": cache[:, :, pos:pos + 1] for n, cache in zip(runner.cache_names, caches)}}
            for name, want in reference_outputs(model, k, c, feeds).items():
                diff = np.abs(got[name] - want)
                err = float(diff.max())
                worst[name] = max(worst.get(name, 0.0), err if np.isfinite(err) else math.inf)
                # Polygraphy's rule, element by element: |a - b| <= atol + rtol |b|
                passed = passed and bool(np.all(diff <= atol + (options.rtol or 0.0) * np.abs(want)))
        max_abs = max(worst.values())
        checks.append(Check(f"block {k} native step", passed and math.isfinite(max_abs),
                            {"atol": atol, "max_abs": max_abs, "worst_output": max(worst, key=worst.get),
                             "contract": "step_rows", "inputs": len(all_feeds)}))
    return checks


def fused_checks(src, model, options: CheckOptions) -> tuple[list[Check], list[dict], list[dict]]:
    """ort-cpu's fused step graph (sejd/engines/ort_fused_step.py) of every block whose engines ship it,
    against the PyTorch reference on the `step_rows` graph's inputs and contract tolerance (it answers to that
    contract), run as the runners run it: the caches bound in place, which must change nowhere but at the
    token's position. Selected by `--graphs` as the variant `step_fused`. Returns (checks, compared graphs,
    skipped graphs)."""
    from sejd.engines.ort_fused_step import compare, dims_of

    sessions = next((s for s in (getattr(r, "sessions", None) for r in src.runners or ())
                     if hasattr(s, "fused_step")), None)
    if sessions is None:
        return [], [], []
    cfg = model.config
    shipped = [{"block": k, "variant": FUSED_VARIANT, "file": sessions.fused_step(k)}
               for k in range(cfg.num_blocks) if sessions.fused_step(k) is not None]
    spec = options.graphs if options.graphs is not None else (",".join(QUICK_GRAPHS) if options.quick else None)
    chosen, skipped = select_graphs(shipped, spec, cfg.num_blocks)
    if not chosen:
        return [], chosen, skipped
    c = contract(cfg, "step_rows")
    atol = options.atol if options.atol is not None else c.atol
    all_feeds = graph_feeds(c, cfg, feed_specs(options.seed, options.quick)) if chosen else []
    checks = []
    for g in progress(chosen, desc="check fused step", enabled=options.show_progress):
        k = g["block"]
        result = compare(sessions.get(FUSED_VARIANT, k, single_thread=True), dims_of(model.blocks[k].spec),
                         model, k, all_feeds, atol, options.rtol or 0.0)
        checks.append(Check(graph_name(g), result["passed"],
                            {"atol": atol, "rtol": options.rtol or 0.0, "max_abs": result["max_abs"],
                             "worst_output": result["worst_output"], "per_output_max_abs": result["per_output_max_abs"],
                             "contract": "step_rows", "precision": "fp32", "inputs": result["inputs"]}))
    return checks, chosen, skipped


def check_source(src, model, options: CheckOptions | None = None, engine_model=None) -> CheckReport:
    """Check `src` (a Session: a bundle's engines, or a checkpoint on torch / torch-cuda) against `model`,
    the fp32 PyTorch reference on the CPU. `engine_model`: the model the engine runners run with, when it
    is not `model` (torch-cuda: a copy on the device)."""
    options = options or CheckOptions()
    precision = src.precision
    tuned = bool(src.tuned_plans())
    plans, plans_skipped = choose_plans(options, tuned, is_starflow(model.config))  # validated before anything runs
    checks, compared, skipped = graph_checks(src, model, options, precision)
    checks += native_checks(src, model, options, compared)
    fused, fused_compared, fused_skipped = fused_checks(src, model, options)
    checks, compared, skipped = checks + fused, compared + fused_compared, skipped + fused_skipped
    batch = 1 if options.quick else 4
    checks += check_end_to_end(src, model, plans, batch=batch, seed=options.seed, show_progress=options.show_progress,
                               quality_plans=("auto",), engine_model=engine_model, precision=precision)
    tol = "contract (per graph, at the engines' precision)" if options.atol is None else f"atol {options.atol}"
    scope = {"graphs_compared": [graph_name(g) for g in compared], "graphs_skipped": [graph_name(g) for g in skipped],
             "feeds": feed_specs(options.seed, options.quick) if compared else [], "quick": options.quick,
             "tolerance": f"{tol}, rtol {options.rtol or 0.0}", "plans_compared": plans, "plans_skipped": plans_skipped,
             "plan_batch": batch, "seed": options.seed,
             "failures_saved_in": next((c.saved_in for c in checks if c.saved_in), None)}
    return CheckReport(src.backend, checks, scope)


def check_bundle(bundle: Bundle, backend: str, plans=None, show_progress=True,
                 options: CheckOptions | None = None) -> CheckReport:
    """`sejd check` on a loaded bundle; `plans` (if given) overrides `options.plans`."""
    from sejd.workflows.source import Session, tuned_plans

    options = options or CheckOptions(show_progress=show_progress)
    if plans is not None:  # the tuned plan is the default one: checked whenever there is one
        tuned = ("auto",) if tuned_plans(bundle) else ()
        options = dataclasses.replace(options, plans=tuple(p for p in plans if p != "auto") + tuned)
    found, precision = backends.backend(backend)
    runners = found.runners(bundle, precision)
    engine_model = getattr(runners[0], "model", None)  # torch-cuda runners carry their own (device) model
    if engine_model is not None and engine_model.var.device.type == "cpu":
        model = engine_model  # ort-cpu's runners carry the bundle's own fp32 model: no second copy
    else:
        model = bundle.load_model()
    return check_source(Session(model, runners, backend, bundle), model, options, engine_model)
