"""`sejd check`: prove that a backend's engines compute what the PyTorch reference computes.

1. Per graph: Polygraphy's Comparator runs the engine and a PyTorch reference runner on several
   seeded inputs (batch 1 and 3, plain and CFG rows) and compares every output with the contract's
   absolute tolerance; the report keeps max/mean error and the tolerance that would have passed.
2. End to end: each named plan sampled on the engines against exact sequential decoding on PyTorch
   from the same noise (PSNR on images mapped to [0, 1], max abs error).

Results are values: `CheckReport` is truthy only when every check passed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from sejd.bundle import Bundle
from sejd.export.contracts import contract, dummy_inputs, tolerance
from sejd.export.reference import reference_outputs
from sejd.util import progress

PSNR_FLOOR_DB = 40.0  # DESIGN.md §7: the default plan must stay >= 40 dB against exact decoding
PARITY_DB = 60.0  # an engine running a plan must match PyTorch running the same plan to round-off
# ... in reduced precision, to that precision's round-off. Measured on builtin:textures, H200 (docs/gpu/
# checks.json), same plan engine vs fp32 PyTorch: fp16 54.8-67.5 dB, bf16 33.1-46.4 dB, the lowest being
# GS-Jacobi at tau 0.5, whose stopping point on the first block moves with the round-off
PARITY_DB_BY_PRECISION = {"fp32": PARITY_DB, "fp16": 45.0, "bf16": 30.0}
END_TO_END_PLANS = ("sequential", "ujd", "sjd", "gs-jacobi")


@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    figures: dict
    enforced: bool = True  # informational checks are reported but do not fail the report

    def line(self) -> str:
        fig = ", ".join(f"{k}={_fmt(v)}" for k, v in self.figures.items() if not isinstance(v, dict))
        status = ("PASS" if self.passed else "FAIL") if self.enforced else ("info" if self.passed else "low ")
        return f"{status}  {self.name}: {fig}"


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


@dataclasses.dataclass
class CheckReport:
    backend: str
    checks: list[Check]

    def __bool__(self):
        return all(c.passed or not c.enforced for c in self.checks)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "passed": bool(self), "checks": [dataclasses.asdict(c) for c in self.checks]}

    def summary(self) -> str:
        enforced = [c for c in self.checks if c.enforced]
        failed = sum(not c.passed for c in enforced)
        return "\n".join([c.line() for c in self.checks] +
                         [f"{len(enforced) - failed}/{len(enforced)} enforced checks passed on {self.backend} "
                          f"(+{len(self.checks) - len(enforced)} informational)"])


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] mapped to [0, 1]."""
    mse = float((((a - b) / 2) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def callable_runner(name: str, c, fn):
    """A Polygraphy runner over `fn(feed_dict) -> {output name: array}` for a graph contract `c`."""
    from polygraphy.backend.base import BaseRunner

    class _Runner(BaseRunner):
        def __init__(self):
            super().__init__(name=name)

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata
            meta = TensorMetadata()
            for s in c.inputs:
                meta.add(s.name, np.dtype(s.dtype), [d if isinstance(d, int) else -1 for d in s.shape])
            return meta

        def infer_impl(self, feed_dict):
            import time
            t0 = time.perf_counter()
            out = fn(feed_dict)
            self.inference_time = time.perf_counter() - t0  # Polygraphy reads it after every call
            return out

    return _Runner()


def reference_runner(model, block, c):
    """The PyTorch reference (runner + decoders) evaluating a graph's contract."""
    return callable_runner(f"pytorch[{c.variant}]", c, lambda feeds: reference_outputs(model, block, c, feeds))


def graph_feeds(c, cfg, seeds=(0, 1)) -> list[dict]:
    feeds = []
    for seed in seeds:
        for batch, cfg_rows in ((1, False), (3, False), (3, True)):
            if c.variant == "forward" and cfg_rows:
                continue
            # jacobi_loop: once to convergence at a loose tau, once to the exact result
            tau = 0.3 if seed % 2 else 0.0
            feeds.append(dummy_inputs(c, cfg, batch=batch, cfg_rows=cfg_rows, seed=seed * 10 + batch, tau=tau))
    return feeds


def ort_engine_runner(bundle: Bundle, backend: str):
    """Polygraphy's ONNX Runtime runner over each built engine, with the backend's providers and options."""
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from sejd.engines import engine_dir
    from sejd.engines.ort import load_engine_manifest, providers, session_options

    load_engine_manifest(bundle, backend)

    def runner(g, c):
        path = str(engine_dir(bundle, backend) / g["file"])
        return OnnxrtRunner(lambda: ort.InferenceSession(path, session_options(level="none"),
                                                         providers=providers(bundle, backend, g)))
    return runner


def check_graphs(bundle: Bundle, backend: str, model, show_progress=True, precision: str = "fp32",
                 engine_runner=None, graphs=None) -> list[Check]:
    """Polygraphy's Comparator: each graph on the engine vs the PyTorch reference, with the contract's
    tolerance at `precision`. `engine_runner(graph entry, contract)` makes the engine's Polygraphy
    runner (default: the backend's ONNX Runtime engines); `graphs`: a subset of the manifest's."""
    from polygraphy.comparator import Comparator
    try:  # Polygraphy >= 0.50 names it SimpleCompareFunc; CompareFunc.simple is deprecated
        from polygraphy.comparator.compare import SimpleCompareFunc as simple_compare
    except ImportError:
        from polygraphy.comparator import CompareFunc
        simple_compare = CompareFunc.simple
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # sejd prints its own report
    engine_runner = engine_runner or ort_engine_runner(bundle, backend)
    checks = []
    graphs = bundle.manifest["graphs"] if graphs is None else graphs
    for g in progress(graphs, desc=f"check graphs on {backend}", enabled=show_progress):
        c = contract(bundle.config, g["variant"], bundle.unroll)
        ref = reference_runner(model, g["block"], c)
        results = Comparator.run([ref, engine_runner(g, c)], data_loader=graph_feeds(c, bundle.config))
        atol = {n: tolerance(c, precision) for n in c.output_names}
        accuracy = Comparator.compare_accuracy(results, compare_func=simple_compare(atol=atol, rtol=0.0),
                                               fail_fast=False)
        max_err, mean_err = {}, {}
        for result in accuracy:  # one AccuracyResult per compare function: {runner pair: [per-iteration]}
            for iteration in (it for pair in result.values() for it in pair):
                for name, r in iteration.items():  # integer outputs compare exactly and give a plain bool
                    max_err[name] = max(max_err.get(name, 0.0), float(getattr(r, "max_absdiff", 0.0 if r else math.inf)))
                    mean_err[name] = max(mean_err.get(name, 0.0), float(getattr(r, "mean_absdiff", max_err[name])))
        name = g["variant"] if g["block"] is None else f"block {g['block']} {g['variant']}"
        built = "fp32" if c.variant == "forward" else precision  # forward is always built in fp32
        figures = {"atol": tolerance(c, precision), "precision": built, "max_abs": max(max_err.values()),
                   "would_pass_atol": max(max_err.values()), "per_output_max_abs": max_err,
                   "per_output_mean_abs": mean_err, "inputs": len(graph_feeds(c, bundle.config))}
        checks.append(Check(name, bool(accuracy), figures))
    return checks


def check_end_to_end(bundle: Bundle, runners, model, plans=END_TO_END_PLANS, batch: int = 4, seed: int = 0,
                     show_progress=True, quality_plans=(), engine_model=None, precision: str = "fp32") -> list[Check]:
    """Every plan: engine == PyTorch running the same plan (enforced), and quality against exact
    sequential decoding (enforced >= 40 dB only for `quality_plans`, e.g. the bundle's tuned plan)."""
    from sejd.runtime.sampler import sample

    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, cfg.num_tokens, cfg.token_dim, generator=g)
    labels = torch.arange(batch) % cfg.num_classes if cfg.num_classes else None
    exact = sample(model, noise, labels=labels, plan="sequential", progress=False).images
    checks = []
    from sejd.source import Source
    src = Source(model, runners, "", bundle)
    for plan in progress(plans, desc="check plans", enabled=show_progress):
        spec = src.plan("auto", batch) if plan == "auto" else plan
        r = sample(engine_model or model, noise, labels=labels, plan=spec, runners=runners, progress=False)
        same = sample(model, noise, labels=labels, plan=spec, progress=False).images  # same plan on PyTorch
        iters = [b.iterations for b in r.stats.blocks]
        floor = PARITY_DB_BY_PRECISION[precision]
        checks.append(Check(f"plan {plan}: engine vs PyTorch, same plan", psnr_db(r.images, same) >= floor,
                            {"psnr_db": psnr_db(r.images, same), "psnr_floor_db": floor, "precision": precision,
                             "max_abs": float((r.images - same).abs().max()), "iterations_per_block": iters}))
        checks.append(Check(f"plan {plan}: engine vs exact sequential", psnr_db(r.images, exact) >= PSNR_FLOOR_DB,
                            {"psnr_db": psnr_db(r.images, exact), "psnr_floor_db": PSNR_FLOOR_DB,
                             "max_abs": float((r.images - exact).abs().max())},
                            enforced=plan in quality_plans or plan == "sequential"))
    return checks


def check_bundle(bundle: Bundle, backend: str, plans=END_TO_END_PLANS, show_progress=True) -> CheckReport:
    from sejd.engines import engine_precision, runners_for, split_backend

    model = bundle.load_model()
    precision = engine_precision(bundle, backend)
    plans = [p for p in plans if p != "auto"]
    if (bundle.path / "plan.json").exists():
        plans.append("auto")  # the tuned plan is the default one: its quality bar is enforced
    name = split_backend(backend)[0]
    runners = runners_for(bundle, backend)
    checks = []
    if name.startswith("ort-"):
        checks = check_graphs(bundle, name, model, show_progress, precision)
    elif name == "tensorrt":
        from sejd.engines.tensorrt import trt_engine_runner
        checks = check_graphs(bundle, name, model, show_progress, precision, trt_engine_runner(bundle))
    elif name == "torch-cuda":  # the graph modules themselves, on the GPU, at the backend's precision
        from sejd.engines.torch_graphs import MODULE_VARIANTS, module_runner
        graphs = [g for g in bundle.manifest["graphs"] if g["variant"] in MODULE_VARIANTS]
        checks = check_graphs(bundle, backend, model, show_progress, precision,
                              lambda g, c: module_runner(runners[0].model, g["block"], c, precision), graphs)
    engine_model = getattr(runners[0], "model", None)  # torch-cuda runners carry their own (device) model
    checks += check_end_to_end(bundle, runners, model, plans, show_progress=show_progress,
                               quality_plans=("auto",), engine_model=engine_model, precision=precision)
    return CheckReport(backend, checks)
