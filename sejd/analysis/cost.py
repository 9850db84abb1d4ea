"""What a Jacobi pass costs in sequential steps on the backend the profile runs on: the exchange rate
that decides whether a block's Jacobi iterations are cheaper than its T-1 steps."""

from __future__ import annotations

import statistics
import time

STEPS_TIMED = 16  # consecutive steps per timing, from the middle of the sequence (a typical KV prefix)


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        float(out.flatten()[0])  # wait for the device, whatever runs the runner
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pass_cost(runner, z, cond, repeats: int = 5) -> dict:
    """Median seconds of one full Jacobi pass and of one KV-cached step on block input z (B, T, D)."""
    runner.begin(z.shape[0], cond)
    start = runner.num_tokens // 2

    def steps():
        for pos in range(start, min(start + STEPS_TIMED, runner.num_tokens - 1)):
            xa, _ = runner.step(z[:, pos], pos)
        return xa

    step = _timed(steps, repeats) / max(1, min(STEPS_TIMED, runner.num_tokens - 1 - start))
    jacobi_pass = _timed(lambda: runner.jacobi_iter(z, z)[1], repeats)
    return {"pass_seconds": jacobi_pass, "step_seconds": step, "pass_in_steps": jacobi_pass / step}
