"""Decoders: invert one flow block, written once against `BlockRunner`.

Notation (DESIGN.md §3): in the block's own order, x_0 = z_0 and x_l = z_l * exp(a(x_<l)) + b(x_<l).
A Jacobi iteration updates every token in parallel from the previous iterate; after t iterations the
first t+1 tokens are exact, so T-1 iterations always reach the exact (sequential) result.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from sejd.errors import DecodeError
from sejd.runtime.plan import BlockPlan
from sejd.runtime.runner import BlockRunner, affine


@dataclasses.dataclass
class Decoded:
    x: torch.Tensor  # (B, T, D) the block's solution, in its own order
    iterations: int  # parallel passes (Jacobi) or sequential steps
    residual: float  # final max |x^t - x^(t-1)|; 0 for exact sequential decoding
    residuals: list[float] = dataclasses.field(default_factory=list)  # per iteration, for plots
    converged: bool = True  # False when a cap stopped Jacobi and sequential steps finished the block
    sequential_steps: int = 0  # steps used to finish exactly after a capped Jacobi
    last_residual: torch.Tensor | None = None  # (B,) per-sample residual of the last iteration
    sample_iterations: list[int] | None = None  # per sample, when samples stop on their own


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise DecodeError(f"non-finite values appeared during {what}; the model or its input is broken")


def sequential(runner: BlockRunner, z: torch.Tensor, x: torch.Tensor | None = None, start: int = 0,
               bar=None) -> Decoded:
    """Exact KV-cached decoding of tokens start+1 .. T-1; tokens <= start of `x` are final and
    positions < start are already in the runner's cache."""
    x = z.clone() if x is None else x.clone()
    if start == 0:
        x[:, 0] = z[:, 0]
    for i in range(start, runner.num_tokens - 1):
        xa, xb = runner.step(x[:, i], i)
        x[:, i + 1] = affine(z[:, i + 1], xa, xb)
        if bar is not None:
            bar.update(1)
    _check_finite(x, "sequential decoding")
    return Decoded(x, runner.num_tokens - 1 - start, 0.0, sequential_steps=runner.num_tokens - 1 - start)


def jacobi(runner: BlockRunner, z: torch.Tensor, x0: torch.Tensor, tau: float, max_iters: int | None = None,
           bar=None, variant: str = "host", chunk: int = 1, finish_exactly: bool = True,
           freeze: bool = False, cond=None) -> Decoded:
    """Parallel fixed-point iterations from x0 until max |x^t - x^(t-1)| < tau, at most T-1 of them.

    variant: "host" checks the residual after every iteration; "chunk" runs `chunk` iterations per
    engine call (jacobi_k) and checks between chunks; "loop" runs the whole loop in one engine call.
    freeze (host only): tokens before the first one that still moves by >= tau * FREEZE_RATIO are
    final; they stay in the KV cache and later iterations only run the tokens after them.
    cond (host only): the batch's Conditioning; given, each sample stops on its own residual and
    leaves the batch, so a sample's result does not depend on the other samples in its batch.
    """
    T = runner.num_tokens
    cap = T - 1 if max_iters is None else min(max_iters, T - 1)
    x = x0.clone()
    x[:, 0] = z[:, 0]
    if T == 1:  # a single token is z_0 itself
        return Decoded(x, 0, 0.0, [0.0], last_residual=torch.zeros(z.shape[0]))
    residuals: list[float] = []
    last = torch.full((z.shape[0],), float("inf"))
    per_sample = None
    if freeze and variant == "host":
        x, last, residuals, all_final = _jacobi_frozen_prefix(runner, z, x, tau, cap, bar)
        iterations = len(residuals)
        if all_final:  # every token is final (exact, or moved by < tau/10): nothing left to finish
            return Decoded(x, iterations, residuals[-1], residuals, last_residual=last)
    elif cond is not None and variant == "host":
        x, last, residuals, per_sample = _jacobi_per_sample(runner, z, x, tau, cap, cond, bar)
        iterations = len(residuals)
    elif variant == "loop":
        x, last, iterations = runner.jacobi_loop(z, x, tau, cap)
        residuals = [float(last.max())]
        if bar is not None:
            bar.update(iterations)
    else:
        iterations = 0
        while iterations < cap:
            k = min(chunk, cap - iterations) if variant == "chunk" else 1
            if k == 1:
                x, last = runner.jacobi_iter(z, x)
                per_iter = [last]
            else:
                x, per_iter = runner.jacobi_chunk(z, x, k)
                last = per_iter[-1]
            iterations += k
            residuals += [float(r.max()) for r in per_iter]
            if bar is not None:
                bar.update(k)
            if not residuals[-1] >= tau:  # converged, or NaN (reported below)
                break
    if not math.isfinite(residuals[-1]):
        raise DecodeError(f"non-finite values appeared in Jacobi iteration {iterations}; "
                          "the model or its input is broken")
    if per_sample is not None:
        runner.begin(z.shape[0], cond)  # back to the whole batch
    capped = [] if (residuals[-1] < tau or iterations == T - 1 or not finish_exactly) else \
        (torch.nonzero(~(last < tau)).flatten() if per_sample is not None else torch.arange(z.shape[0]))
    if not len(capped):
        return Decoded(x, iterations, residuals[-1], residuals, last_residual=last, sample_iterations=per_sample)
    # Capped before converging: after t iterations tokens 0..t are exact. Put the exact prefix's keys
    # and values in the cache with one window call, then finish with sequential steps from position t.
    # With per-sample stopping only the capped samples are finished (the others converged).
    B = z.shape[0]
    whole = len(capped) == B
    if not whole:
        runner.begin(len(capped), cond.subset(capped, B))
    sub = x if whole else x[capped]
    runner.project(sub[:, :iterations], 0)
    done = sequential(runner, z if whole else z[capped], sub, start=iterations, bar=bar)
    if whole:
        x = done.x
    else:
        x[capped] = done.x
        runner.begin(B, cond)
    return Decoded(x, iterations, residuals[-1], residuals, converged=False,
                   sequential_steps=done.sequential_steps, last_residual=last, sample_iterations=per_sample)


def _jacobi_per_sample(runner, z, x, tau, cap, cond, bar):
    """Jacobi where a sample leaves the batch as soon as its own residual is below tau: later
    iterations run only the samples still moving (cond rows and uncond rows alike)."""
    B = z.shape[0]
    x = x.clone()
    active = torch.arange(B)
    last = torch.full((B,), float("inf"))
    counts = torch.zeros(B, dtype=torch.long)
    residuals: list[float] = []
    while len(residuals) < cap and len(active):
        x_a, res = runner.jacobi_iter(z[active], x[active])
        res = res.cpu()  # bookkeeping on the host, whatever device the runner uses
        x[active], last[active] = x_a, res
        counts[active] += 1
        residuals.append(float(res.max()))
        if bar is not None:
            bar.update(1)
        keep = ~(res < tau)  # NaN keeps iterating to the cap, then is reported
        if not bool(keep.all()):
            active = active[keep]
            if len(active):
                runner.begin(len(active), cond.subset(active, B))
    residuals[-1] = float(last.max())  # what the batch as a whole ends with
    return x, last, residuals, counts.tolist()


FREEZE_RATIO = 0.1  # a prefix is frozen once its tokens move by less than tau * FREEZE_RATIO
FREEZE_ALIGN = 16  # window starts are multiples of this: few distinct shapes for the engines


def _jacobi_frozen_prefix(runner, z, x, tau, cap, bar):
    """Jacobi over a shrinking window [start, T). Token `frozen` depends only on final tokens, so it
    is exact after each iteration: `frozen` advances by at least one token per iteration, plus every
    following token that moved by less than tau * FREEZE_RATIO. Windows start at `frozen` rounded
    down to FREEZE_ALIGN (re-running a few final tokens changes nothing)."""
    T = runner.num_tokens
    frozen, residuals, committed = 1, [], 1  # the cache holds final keys/values of positions < committed-1
    while len(residuals) < cap and frozen < T:
        old = x
        start = max(1, frozen - frozen % FREEZE_ALIGN)
        if start > committed:  # write the newly frozen tokens' keys/values (a full pass may not have)
            runner.project(x[:, committed - 1:start - 1], committed - 1)
            committed = start
        x, last = runner.jacobi_iter(z, x, start, T)
        change = (x[:, frozen:] - old[:, frozen:]).abs().amax(dim=(0, 2))  # per token, over the batch
        residuals.append(float(change.max()))
        if bar is not None:
            bar.update(1)
        if not residuals[-1] >= tau:
            break
        moving = torch.nonzero(change >= tau * FREEZE_RATIO)
        frozen += max(1, int(moving[0]) if len(moving) else T)
    return x, last, residuals, frozen >= T


def segment_bounds(num_tokens: int, segments: int) -> list[tuple[int, int]]:
    """Target tokens 1..T-1 split into `segments` contiguous, near-equal [a, b) ranges."""
    n = num_tokens - 1
    segments = max(1, min(segments, n))
    cuts = [1 + (n * s) // segments for s in range(segments + 1)]
    return [(cuts[s], cuts[s + 1]) for s in range(segments)]


def gs_jacobi(runner: BlockRunner, z: torch.Tensor, x0: torch.Tensor, tau: float, segments: int,
              bar=None) -> Decoded:
    """Gauss-Seidel over segments, Jacobi inside each: segments are committed in order and the
    committed prefix is reused from the KV cache, so each iteration only runs the segment's window."""
    x = x0.clone()
    x[:, 0] = z[:, 0]
    residuals: list[float] = []
    finals: list[float] = []  # each segment's last residual
    if runner.num_tokens == 1:
        return Decoded(x, 0, 0.0, [0.0])
    for a, b in segment_bounds(runner.num_tokens, segments):
        for _ in range(b - a):  # b-a iterations make the segment exact
            x, res = runner.jacobi_iter(z, x, a, b)
            residuals.append(float(res.max()))
            if bar is not None:
                bar.update(1)
            if residuals[-1] < tau:
                break
        finals.append(residuals[-1])
        # the cache holds keys/values of the last iterate *before* its update: commit the final values
        if b < runner.num_tokens:
            runner.project(x[:, a - 1:b - 1], a - 1)
    _check_finite(x, "GS-Jacobi decoding")
    return Decoded(x, len(residuals), max(finals, default=0.0), residuals)


def fixed_jacobi(runner: BlockRunner, z: torch.Tensor, x0: torch.Tensor, iterations: int, variant: str = "host",
                 chunk: int = 1, bar=None) -> Decoded:
    """Exactly `iterations` Jacobi passes (at most T-1, which is exact), with no convergence test and
    no exact finish: for timing at published iteration counts only; the result is not converged by
    design (`converged` is False)."""
    out = jacobi(runner, z, x0, float("-inf"), iterations, bar=bar, variant=variant, chunk=chunk,
                 finish_exactly=False)  # no residual is below -inf: the loop runs to its cap
    return dataclasses.replace(out, converged=False)


def initial_guess(init: str, z: torch.Tensor, prior_noise: torch.Tensor) -> torch.Tensor:
    if init == "zeros":
        return torch.zeros_like(z)
    if init == "noise":
        return prior_noise.clone()
    return z.clone()  # "previous": this block's input, i.e. the output of the block decoded before


def decode_block(runner: BlockRunner, z: torch.Tensor, plan: BlockPlan, prior_noise: torch.Tensor,
                 bar=None, cond=None) -> Decoded:
    if plan.decoder == "sequential":
        if plan.variant == "loop":
            x = runner.sequential_loop(z)
            _check_finite(x, "sequential decoding")
            if bar is not None:
                bar.update(runner.num_tokens - 1)
            return Decoded(x, runner.num_tokens - 1, 0.0, sequential_steps=runner.num_tokens - 1)
        return sequential(runner, z, bar=bar)
    x0 = initial_guess(plan.init, z, prior_noise)
    if plan.decoder == "jacobi" and plan.fixed_iters:
        return fixed_jacobi(runner, z, x0, plan.fixed_iters, plan.variant, plan.chunk, bar)
    if plan.decoder == "jacobi":
        return jacobi(runner, z, x0, plan.tau, plan.max_iters, bar=bar, variant=plan.variant, chunk=plan.chunk,
                      freeze=plan.freeze, cond=cond if plan.per_sample else None)
    return gs_jacobi(runner, z, x0, plan.tau, plan.segments, bar=bar)
