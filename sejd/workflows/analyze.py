"""`sejd analyze`: measure each flow block's dependency redundancy and Jacobi convergence, and say whether
they predict the plan `sejd tune` chose by timing.

Definitions (every block in its own, permuted token order; blocks listed in sampling order, blocks[-1]
first; PSNR compares a block's output tokens with its exact decoding, the peak being the exact output's
range (max - min): scale-free across blocks whose latents span different ranges, and for the last
sampling block, whose output is the image, within a fraction of a dB of sejd's image PSNR):

- Attention window w: every attention layer of the block lets the output at position l (the affine
  parameters of token l+1) attend only to positions l-w+1 .. l. w = T is the exact model; w = 1 makes
  token l+1 a function of token l alone. With L layers per block a token's receptive field is up to
  L*(w-1)+1 tokens: w limits each layer, as a masked-attention experiment does. Implemented in the
  PyTorch model (`MetaBlock.window`), so the KV-cached runners and decoders run windowed blocks
  unchanged; engines (ONNX graphs) have no window input yet, so redundancy always runs on PyTorch.
- Redundancy of block k over a window grid (1, 2, 4, ..., T; quick: 1, 4, 16, ..., T):
  (a) nll_increase: NLL(only block k windowed) - NLL(exact model), whole model, in nats per dimension,
      on held-out data: for models trained by sejd on shipped data (the built-ins) the dataset's held-out
      images plus the training noise sigma (seed 0), as `sejd.workflows.train.evaluate_bpd` measures; for any other
      checkpoint the model's own exact samples (seed + 1);
  (b) psnr_db: PSNR of block k's exact sequential decoding with window w against exact decoding of the
      same input, the input being what exact sampling hands block k (noise seed `seed`, `batch` images).
  window_nll / window_psnr: the smallest grid window from which on every larger window keeps
  nll_increase < nll_tol (default 0.01 nats/dim) / psnr_db > psnr target (default 40 dB); window is the
  larger of the two. A block that needs only a short window is redundant.
- Jacobi profile of block k: Jacobi iterations from zeros on the same exact input, at every iteration t:
  residual (max |x^t - x^(t-1)| over unknown tokens and the batch: what the decoder's tau is compared
  with), psnr_db against exact decoding, exact_prefix (leading tokens within 1e-4 of exact decoding:
  t+1 at least), and the converged-prefix front (for each tau of the grid, the first token still moving
  by >= tau; T when none). iterations_to_tau: iterations the Jacobi decoder with that tau runs;
  tau_for_target: the largest tau whose stopping point reaches the PSNR target. Iterations stop once the
  residual is below every tau and the target is met, at most T-1 (exact).
- Cost of a Jacobi pass in sequential steps (pass_in_steps): the median time of one full Jacobi pass
  over the median time of one KV-cached step, on the profile's backend and batch (or given).
- Predicted selectivity: `sejd.workflows.analysis.selectivity.RULE`: Jacobi where iterations_to_tau(tau_for_target)
  * pass_in_steps < T-1 steps, else sequential (the rule "more than T/8 iterations is sequential" is the
  case of a pass costing 8 steps); beside it the redundancy-only prediction (window >= T/4: sequential),
  and the plan `sejd tune` chose (the bundle's plan for the batch nearest `batch`, or `--plan FILE`),
  block by block, with the agreement of each prediction.

In the JSON, a PSNR of null means identical outputs (infinite PSNR), except for windows listed in a
block's `diverged`, where the windowed decoding left the finite range.
"""

from __future__ import annotations

import math
import time

from sejd.core.util import progress as progress_bar
from sejd.runtime.request import seeded_labels, seeded_noise
from sejd.workflows.analysis.selectivity import RULE, agreement, predict

# the measuring modules are imported where used: the CLI builds this command's parser at every start

SCHEMA = "sejd-analyze/1"
TAUS = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)  # `sejd tune`'s grid
NLL_IMAGES = {False: 64, True: 16}  # by quick
NLL_TOL = 0.01  # nats per dimension
PSNR_TARGET = 40.0  # dB, the quality bar of `sejd tune` and `sejd check`


def likelihood_images(model, count: int, seed: int, progress: bool):
    """Held-out data for the NLL: the shipped dataset the model was trained on, else its own exact samples
    -> (images, labels, description)."""
    import torch

    from sejd.workflows.analysis.trace import exact_trace
    from sejd.workflows.data import DATASETS, load_dataset

    cfg = model.config
    name = getattr(model, "meta", {}).get("dataset")
    if name in DATASETS:
        data = load_dataset(name)
        if (data.in_channels, data.img_size) == (cfg.in_channels, cfg.img_size):
            x, y = data.heldout()
            x, y = x[:count], y[:count]
            sigma = getattr(model, "noise_std", 0.0)
            x = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
            return x, y, f"held-out {name}: {len(x)} images + training noise sigma {sigma} (seed 0)"
    from sejd.runtime.torch_runner import torch_runners

    noise = seeded_noise(count, seed + 1, cfg.num_tokens, cfg.token_dim)
    labels = seeded_labels(count, None, cfg.num_classes)
    bar = progress_bar(total=cfg.num_blocks * (cfg.num_tokens - 1), desc="exact samples for the NLL",
                       enabled=progress)
    trace = exact_trace(model, torch_runners(model), noise, labels, bar=bar)
    bar.close()
    return trace.images.cpu(), labels, f"the model's own exact samples: {count} images (noise seed {seed + 1})"


def compared_plan(src, batch: int, plan: str | None):
    """(Plan, where it came from) to compare with: `plan` if given, else the bundle's tuned plan for the
    batch nearest `batch`, else (None, None)."""
    from sejd.runtime.plan import resolve_plan

    if plan is not None:
        return resolve_plan(plan, src.model.config.num_blocks), str(plan)
    if src.tuned_plans():
        return src.plan("auto", batch), src.tuned_plan(batch)
    return None, None


def analyze(src, source_name: str = "", batch: int = 1, quick: bool = False, psnr: float = PSNR_TARGET,
            nll_tol: float = NLL_TOL, taus=TAUS, plan: str | None = None, seed: int = 0,
            pass_in_steps: float | None = None, progress: bool = True) -> dict:
    """Redundancy, Jacobi profile and predicted selectivity of every block of `src`'s model (a
    `sejd.workflows.source.Session`; see above)."""
    from sejd.runtime.torch_runner import torch_runners
    from sejd.workflows.analysis.cost import pass_cost
    from sejd.workflows.analysis.profile import jacobi_profile
    from sejd.workflows.analysis.redundancy import Likelihood, block_redundancy
    from sejd.workflows.analysis.trace import exact_trace
    from sejd.workflows.analysis.window import window_grid

    started = time.perf_counter()
    model, cfg = src.model, src.model.config
    T, order = cfg.num_tokens, list(reversed(range(cfg.num_blocks)))
    windows = window_grid(T, quick)
    noise = seeded_noise(batch, seed, T, cfg.token_dim)
    labels = seeded_labels(batch, None, cfg.num_classes)
    bar = progress_bar(total=cfg.num_blocks * (T - 1), desc="exact sampling", enabled=progress)
    reference = exact_trace(model, torch_runners(model), noise, labels, bar=bar)
    bar.close()
    phases = {"exact_sampling": time.perf_counter() - started}
    images, image_labels, data_note = likelihood_images(model, NLL_IMAGES[quick], seed, progress)
    likelihood = Likelihood(model, images, image_labels)
    phases["nll_data"] = time.perf_counter() - started - sum(phases.values())

    bar = progress_bar(total=cfg.num_blocks * len(windows), desc="redundancy (block x window)", enabled=progress)
    redundancy = [block_redundancy(model, likelihood, tb, reference.cond, windows, nll_tol, psnr, bar)
                  for tb in reference.blocks]
    bar.close()
    phases["redundancy"] = time.perf_counter() - started - sum(phases.values())

    # the profile runs on the source's backend (engines where it has them) against its own exact decoding
    profiled = reference if src.runners is None else exact_trace(model, src.runners, noise, labels)
    runners = src.runners or torch_runners(model)
    profiles = []
    for tb in profiled.blocks:
        bar = progress_bar(total=T - 1, desc=f"Jacobi profile block {tb.block}", enabled=progress)
        profiles.append(jacobi_profile(runners[tb.block], tb, profiled.cond, tuple(taus), psnr, bar))
        bar.close()

    first = profiled.blocks[0]
    cost = {"source": "given", "pass_in_steps": pass_in_steps} if pass_in_steps is not None else \
        {"source": "measured on the first sampling block", **pass_cost(runners[first.block], first.z, profiled.cond)}
    phases["jacobi_profile"] = time.perf_counter() - started - sum(phases.values())
    blocks = [{"block": k, "order": i, "redundancy": r, "jacobi": p}
              for i, (k, r, p) in enumerate(zip(order, redundancy, profiles))]
    result = {
        "schema": SCHEMA, "source": source_name, "backend": src.backend,
        "profile_backend": src.backend if src.runners is not None else "torch", "redundancy_backend": "torch",
        "batch": batch, "quick": quick, "seed": seed, "config": cfg.to_dict(), "num_tokens": T,
        "tolerances": {"nll_nats_per_dim": nll_tol, "psnr_db": psnr},
        "windows": windows, "taus": list(taus), "nll_data": data_note, "nll_exact_nats_per_dim": likelihood.exact,
        "rule": RULE, "definitions": definitions(), "blocks": blocks,
    }
    apply_rule(result, cost)
    with_plan(result, *compared_plan(src, batch, plan))
    result["seconds"] = time.perf_counter() - started
    result["seconds_by_phase"] = phases
    return result


def apply_rule(result: dict, cost: dict) -> dict:
    """(Re)predict every block's decoder with a Jacobi pass costing cost["pass_in_steps"] steps: e.g. to
    ask what the measurements predict on other hardware, whose pass/step ratio is known."""
    result["cost"] = cost
    for b in result["blocks"]:
        b["predicted"] = predict(result["num_tokens"], b["redundancy"], b["jacobi"], cost["pass_in_steps"])
    return _summarize(result)


def with_plan(result: dict, plan, where: str | None) -> dict:
    """Set (or replace) the plan `result`'s predictions are compared with (a Plan, or None): an analysis
    can so be compared with a plan tuned after it, or on other hardware."""
    result["tuned_plan"] = where
    for b in result["blocks"]:
        tuned = None if plan is None else plan.blocks[b["block"]]
        b["tuned"] = None if tuned is None else {
            "decoder": tuned.decoder, "tau": None if tuned.decoder == "sequential" else tuned.tau,
            "variant": tuned.variant}
    return _summarize(result)


def _summarize(result: dict) -> dict:
    blocks = result["blocks"]
    compared = [b for b in blocks if b.get("tuned")]
    for b in compared:
        b["tuned"].update(agreement(b["predicted"], b["tuned"]["decoder"]))

    def count(key):
        return f"{sum(b['tuned'][key] for b in compared)}/{len(compared)}" if compared else None

    result["summary"] = {
        "blocks_in_sampling_order": [b["block"] for b in blocks],
        "window": [b["redundancy"]["window"] for b in blocks],
        "psnr_db_at_window_1": [b["redundancy"]["psnr_db"][0] for b in blocks],
        "nll_increase_at_window_1": [b["redundancy"]["nll_increase"][0] for b in blocks],
        "iterations_to_target": [b["jacobi"]["iterations_to_target"] for b in blocks],
        "tau_for_target": [b["jacobi"]["tau_for_target"] for b in blocks],
        "pass_in_steps": result["cost"]["pass_in_steps"],
        "predicted": [b["predicted"]["decoder"] for b in blocks],
        "predicted_by_window": [b["predicted"]["by_window"] for b in blocks],
        "tuned": [b["tuned"]["decoder"] for b in compared] if compared else None,
        "agreement": count("agree"), "agreement_by_window": count("agree_by_window"),
    }
    return result


def definitions() -> dict:
    """The definitions above, one line each, for the JSON."""
    return {
        "window": "attention of every layer of the block restricted to positions l-w+1..l for the output at l "
                  "(parameters of token l+1), in the block's own token order; w = T is the exact model",
        "nll_increase": "whole-model NLL (nats/dim) with only this block windowed minus the exact model's, "
                        "on nll_data",
        "psnr_db": "PSNR (peak: the exact output's range) of the block's exact sequential decoding with window w "
                   "against exact decoding, on the inputs exact sampling hands the block; null = identical (infinite)",
        "window_nll": "smallest grid window from which on nll_increase < tolerance",
        "window_psnr": "smallest grid window from which on psnr_db > tolerance",
        "residual": "per Jacobi iteration from zeros: max |x^t - x^(t-1)| over unknown tokens and the batch",
        "exact_prefix": "per iteration: leading tokens within 1e-4 of exact decoding (>= t+1 after t iterations)",
        "front": "per tau and iteration: the first token still moving by >= tau (T when none)",
        "iterations_to_tau": "iterations until residual < tau (what the Jacobi decoder with that tau runs)",
        "tau_for_target": "largest tau whose stopping point reaches the PSNR target",
    }


def json_safe(value):
    """Non-finite floats -> None (JSON has no infinity); containers converted recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def table(result: dict) -> str:
    T = result["num_tokens"]
    rows = [f"{'order':>5} {'block':>5} {'window':>7} {'(nll':>6} {'psnr)':>6} {'iters':>6} {'tau':>6} "
            f"{'predicted':>10} {'tuned':>10} {'agree':>5}"]
    for b in result["blocks"]:
        r, p, t = b["redundancy"], b["predicted"], b["tuned"]
        iters = "-" if p["iterations"] is None else str(p["iterations"])
        tau = "-" if b["jacobi"]["tau_for_target"] is None else f"{b['jacobi']['tau_for_target']:g}"
        rows.append(f"{b['order']:>5} {b['block']:>5} {r['window']:>7} {r['window_nll']:>6} {r['window_psnr']:>6} "
                    f"{iters:>6} {tau:>6} {p['decoder']:>10} {t['decoder'] if t else '-':>10} "
                    f"{('yes' if t['agree'] else 'no') if t else '-':>5}")
    s = result["summary"]
    rows.append(f"T = {T}; a Jacobi pass costs {s['pass_in_steps']:.2f} steps: Jacobi pays below "
                f"{(T - 1) / s['pass_in_steps']:.1f} iterations; redundancy alone: sequential if window >= {T // 4} "
                f"(T/4); agreement with the tuned plan: {s['agreement'] or 'n/a'} (redundancy alone "
                f"{s['agreement_by_window'] or 'n/a'}); {result['seconds']:.1f} s")
    return "\n".join(rows)
