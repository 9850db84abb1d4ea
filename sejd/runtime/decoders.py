"""Decoders: invert one flow block, written once against `BlockRunner`.

Notation: in the block's own order, x_0 = z_0 and x_l = z_l * exp(a(x_<l)) + b(x_<l).
A Jacobi iteration updates every token in parallel from the previous iterate; after t iterations the
first t+1 tokens are exact, so T-1 iterations always reach the exact (sequential) result.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from sejd.core.errors import DecodeError, InputError
from sejd.model.block import affine
from sejd.runtime.plan import BlockPlan
from sejd.runtime.runner import BlockRunner, Conditioning


@dataclasses.dataclass
class Decoded:
    x: torch.Tensor  # (B, T, D) the block's solution, in its own order
    iterations: int  # parallel passes (Jacobi) or sequential steps
    residual: float  # final max |x^t - x^(t-1)|; 0 for exact sequential decoding
    residuals: list[float] = dataclasses.field(default_factory=list)  # per iteration, for plots
    converged: bool = True  # False when a cap stopped Jacobi first (then sequential steps finish the block)
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
        _advance(bar, 1)
    _check_finite(x, "sequential decoding")
    return Decoded(x, runner.num_tokens - 1 - start, 0.0, sequential_steps=runner.num_tokens - 1 - start)


def jacobi(runner: BlockRunner, z: torch.Tensor, x0: torch.Tensor, tau: float, max_iters: int | None = None,
           bar=None, variant: str = "host", chunk: int = 1, finish_exactly: bool = True,
           freeze: bool = False, per_sample: bool = False, cond: Conditioning | None = None) -> Decoded:
    """Parallel fixed-point iterations from x0 until max |x^t - x^(t-1)| < tau, at most
    min(max_iters, T-1) of them; a run the cap stopped is finished exactly by `finish_capped` unless
    finish_exactly is False (its result then has converged False).

    The strategy: variant "loop" -> `jacobi_one_call`, "chunk" -> `jacobi_chunked` (`chunk`
    iterations per engine call); variant "host" -> `jacobi_frozen_prefix` with freeze,
    `jacobi_per_sample` with per_sample (which needs `cond`, the batch's Conditioning), else
    `jacobi_host`. freeze is ignored by the engine-driven variants.
    """
    if per_sample and (variant != "host" or freeze):
        raise InputError(f"per-sample stopping needs variant 'host' without freeze, got variant {variant!r}"
                         f"{' with freeze' if freeze else ''}")
    if per_sample and cond is None:
        raise InputError("per-sample stopping needs the batch's Conditioning (cond) to run a subset of the "
                         "batch, got None")
    T = runner.num_tokens
    cap = T - 1 if max_iters is None else min(max_iters, T - 1)
    x = x0.clone()
    x[:, 0] = z[:, 0]
    if T == 1:  # a single token is z_0 itself
        return Decoded(x, 0, 0.0, [0.0], last_residual=torch.zeros(z.shape[0]))
    if variant == "loop":
        out = jacobi_one_call(runner, z, x, tau, cap, bar)
    elif variant == "chunk":
        out = jacobi_chunked(runner, z, x, tau, cap, chunk, bar)
    elif freeze:
        out = jacobi_frozen_prefix(runner, z, x, tau, cap, bar)
    elif per_sample:
        out = jacobi_per_sample(runner, z, x, tau, cap, cond, bar)
    else:
        out = jacobi_host(runner, z, x, tau, cap, bar)
    if not math.isfinite(out.residual):
        raise DecodeError(f"non-finite values appeared in Jacobi iteration {out.iterations}; "
                          "the model or its input is broken")
    if out.converged or not finish_exactly:
        return out
    return finish_capped(runner, z, out, _capped_samples(out, tau), cond, bar)


def _advance(bar, steps: int) -> None:
    if bar is not None:
        bar.update(steps)


def _iterated(runner: BlockRunner, x, last, residuals: list[float], tau: float, iterations: int | None = None,
              final: bool = False, sample_iterations: list[int] | None = None) -> Decoded:
    """A Jacobi run before any exact finish. It has converged when its residual fell below tau or it is
    exact anyway: T-1 iterations, or (`final`) every token known final."""
    iterations = len(residuals) if iterations is None else iterations
    converged = final or iterations == runner.num_tokens - 1 or residuals[-1] < tau
    return Decoded(x, iterations, residuals[-1], residuals, converged=converged, last_residual=last,
                   sample_iterations=sample_iterations)


def jacobi_host(runner: BlockRunner, z, x, tau: float, cap: int, bar=None) -> Decoded:
    """Full Jacobi iterations, the residual checked on the host after every one."""
    return jacobi_chunked(runner, z, x, tau, cap, 1, bar)


def jacobi_chunked(runner: BlockRunner, z, x, tau: float, cap: int, chunk: int, bar=None) -> Decoded:
    """Full Jacobi iterations, `chunk` per engine call (the bundle's unrolled jacobi_k), the residual
    checked between calls: up to chunk-1 iterations may run past convergence."""
    residuals: list[float] = []
    while len(residuals) < cap:
        k = min(chunk, cap - len(residuals))
        if k == 1:  # the single-iteration graph: jacobi_k is unrolled for exactly `chunk`
            x, last = runner.jacobi_iter(z, x)
            per_iter = [last]
        else:
            x, per_iter = runner.jacobi_chunk(z, x, k)
            last = per_iter[-1]
        residuals += [float(r.max()) for r in per_iter]
        _advance(bar, k)
        if not residuals[-1] >= tau:  # converged, or NaN (reported by the caller)
            break
    return _iterated(runner, x, last, residuals, tau)


def jacobi_one_call(runner: BlockRunner, z, x, tau: float, cap: int, bar=None) -> Decoded:
    """The whole Jacobi loop in one engine call (an ONNX Loop): only the last residual comes back. A runner
    without the call iterates from the host."""
    got = runner.jacobi_loop(z, x, tau, cap)
    if got is None:
        host = jacobi_host(runner, z, x, tau, cap, bar)
        x, last, iterations = host.x, host.last_residual, host.iterations
    else:
        x, last, iterations = got
        _advance(bar, iterations)
    return _iterated(runner, x, last, [float(last.max())], tau, iterations)


def jacobi_per_sample(runner: BlockRunner, z, x, tau: float, cap: int, cond: Conditioning, bar=None) -> Decoded:
    """Jacobi where a sample leaves the batch as soon as its own residual is below tau: later
    iterations run only the samples still moving (cond rows and uncond rows alike), so a sample's
    result does not depend on the other samples in its batch. The runner ends on the whole batch."""
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
        _advance(bar, 1)
        keep = ~(res < tau)  # NaN keeps iterating to the cap, then is reported
        if not bool(keep.all()):
            active = active[keep]
            if len(active):
                runner.begin(len(active), cond.subset(active, B))
    runner.begin(B, cond)  # back to the whole batch
    residuals[-1] = float(last.max())  # what the batch as a whole ends with
    return _iterated(runner, x, last, residuals, tau, sample_iterations=counts.tolist())


FREEZE_RATIO = 0.1  # a prefix is frozen once its tokens move by less than tau * FREEZE_RATIO
FREEZE_ALIGN = 16  # window starts are multiples of this: few distinct shapes for the engines


def jacobi_frozen_prefix(runner: BlockRunner, z, x, tau: float, cap: int, bar=None) -> Decoded:
    """Jacobi over a shrinking window [start, T). Token `frozen` depends only on final tokens, so it
    is exact after each iteration: `frozen` advances by at least one token per iteration, plus every
    following token that moved by less than tau * FREEZE_RATIO. Windows start at `frozen` rounded
    down to FREEZE_ALIGN (re-running a few final tokens changes nothing). Once every token is final
    the run has converged, whatever its last residual."""
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
        _advance(bar, 1)
        if not residuals[-1] >= tau:
            break
        moving = torch.nonzero(change >= tau * FREEZE_RATIO)
        frozen += max(1, int(moving[0]) if len(moving) else T)
    return _iterated(runner, x, last, residuals, tau, final=frozen >= T)


def _capped_samples(out: Decoded, tau: float) -> torch.Tensor:
    """The samples a capped run must finish: the whole batch, or with per-sample stopping those still
    moving (each converged sample has left the batch with its own result)."""
    if out.sample_iterations is None:
        return torch.arange(out.x.shape[0])
    return torch.nonzero(~(out.last_residual < tau)).flatten()


def finish_capped(runner: BlockRunner, z: torch.Tensor, capped: Decoded, samples: torch.Tensor,
                  cond: Conditioning | None = None, bar=None) -> Decoded:
    """The exact finish of a Jacobi run its cap stopped after t = capped.iterations iterations.

    After t iterations tokens 0..t are exact: one window call puts the exact prefix's keys and values
    in the cache, then sequential steps decode from position t. Only `samples` (indices into the batch)
    are finished; a strict subset runs as its own batch with its rows of `cond`, and the runner ends
    on the whole batch again.
    """
    B, t = z.shape[0], capped.iterations
    whole = len(samples) == B
    if not whole:
        if cond is None:
            raise InputError("finishing a subset of the batch needs the batch's Conditioning (cond), got None")
        runner.begin(len(samples), cond.subset(samples, B))
    x = capped.x if whole else capped.x[samples]
    runner.project(x[:, :t], 0)
    done = sequential(runner, z if whole else z[samples], x, start=t, bar=bar)
    if whole:
        x = done.x
    else:
        x = capped.x.clone()
        x[samples] = done.x
        runner.begin(B, cond)
    return dataclasses.replace(capped, x=x, converged=False, sequential_steps=done.sequential_steps)


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
            _advance(bar, 1)
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


def sequential_one_call(runner: BlockRunner, z: torch.Tensor, bar=None) -> Decoded:
    """The exact sequential inversion as one engine call (an ONNX Loop over tokens); a runner without the
    call steps token by token from the host."""
    x = runner.sequential_loop(z)
    if x is None:
        return sequential(runner, z, bar=bar)
    _check_finite(x, "sequential decoding")
    _advance(bar, runner.num_tokens - 1)
    return Decoded(x, runner.num_tokens - 1, 0.0, sequential_steps=runner.num_tokens - 1)


def block_jacobi(runner: BlockRunner, z: torch.Tensor, block_size: int, threshold: float, window_iters: int,
                 bar=None) -> Decoded:
    """ml-starflow's block-wise Jacobi (MetaBlock.jacobi), on any block: windows of `block_size` target
    tokens in order; the guess starts at z itself (token 0 given). Per iteration, the window's inputs (the
    token before it .. its second-last token) are projected after the committed cache, every window token is
    set from the outputs at once, and the window stops when mean((new - old)^2) / mean(new^2) -- one scalar
    over the whole batch, window and channels -- is below `threshold`, or after `window_iters` iterations.

    The KV cache follows ml-starflow through `project`'s own rule: each iteration rewrites the window's
    positions, so stopping keeps the K/V of the last iteration's inputs (the guess before its final update),
    and the next window's first input (the token just written) gets its K/V fresh. With window_iters >=
    block_size every window is exact (iteration k fixes its first k tokens). ml-starflow measures over the
    doubled (guided) batch whose halves are equal: the same scalar as over the B samples here."""
    T = runner.num_tokens
    x = z.clone()
    residuals: list[float] = []
    start = 0
    while start < T - 1:
        n = min(block_size, T - 1 - start)
        for it in range(window_iters):
            xa, xb = runner.project(x[:, start:start + n], start)
            new = affine(z[:, start + 1:start + 1 + n], xa, xb)
            diff = float((new - x[:, start + 1:start + 1 + n]).square().mean() / new.square().mean())
            x[:, start + 1:start + 1 + n] = new
            residuals.append(diff)
            if not diff >= threshold or it == window_iters - 1:  # NaN stops too; reported below
                break
        _advance(bar, n)
        start += n
    _check_finite(x, "block-wise Jacobi decoding")
    return Decoded(x, len(residuals), residuals[-1] if residuals else 0.0, residuals)


def decode_block(runner: BlockRunner, z: torch.Tensor, plan: BlockPlan, prior_noise: torch.Tensor,
                 bar=None, cond: Conditioning | None = None) -> Decoded:
    """Invert one block as its plan says. `cond`, the batch's Conditioning (the runner has begun on it),
    is what per-sample stopping (plan.per_sample) needs to run subsets of the batch."""
    if plan.decoder == "sequential":
        return sequential_one_call(runner, z, bar) if plan.variant == "loop" else sequential(runner, z, bar=bar)
    if plan.decoder == "block-jacobi":
        return block_jacobi(runner, z, plan.block_size, plan.threshold, plan.window_iters, bar)
    x0 = initial_guess(plan.init, z, prior_noise)
    if plan.decoder == "gs-jacobi":
        return gs_jacobi(runner, z, x0, plan.tau, plan.segments, bar=bar)
    if plan.fixed_iters:
        return fixed_jacobi(runner, z, x0, plan.fixed_iters, plan.variant, plan.chunk, bar)
    return jacobi(runner, z, x0, plan.tau, plan.max_iters, bar=bar, variant=plan.variant, chunk=plan.chunk,
                  freeze=plan.freeze, per_sample=plan.per_sample, cond=cond)
