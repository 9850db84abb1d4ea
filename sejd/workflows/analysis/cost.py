"""What a Jacobi pass costs in sequential steps on the backend the profile runs on: the exchange rate
that decides whether a block's Jacobi iterations are cheaper than its T-1 steps."""

from __future__ import annotations

import time

CALLS = 16  # calls timed one by one; the fastest is the cost without other processes in the way


def _fastest_call(calls) -> float:
    """Seconds of the fastest of `calls` (callables returning a tensor), each waited for."""
    times = []
    for call in calls:
        t0 = time.perf_counter()
        out = call()
        float(out.flatten()[0])  # wait for the device, whatever runs the runner
        times.append(time.perf_counter() - t0)
    return min(times)


def pass_cost(runner, z, cond) -> dict:
    """Seconds of one full Jacobi pass and of one KV-cached step on block input z (B, T, D), the fastest
    over CALLS + 1 calls (the first one warms up); steps from the middle of the sequence (a typical KV
    prefix)."""
    runner.begin(z.shape[0], cond)
    start = runner.num_tokens // 2
    positions = [start + i % max(1, runner.num_tokens - 1 - start) for i in range(CALLS + 1)]
    step = _fastest_call([lambda pos=pos: runner.step(z[:, pos], pos)[0] for pos in positions])
    jacobi_pass = _fastest_call([lambda: runner.jacobi_iter(z, z)[1]] * (CALLS + 1))
    return {"pass_seconds": jacobi_pass, "step_seconds": step, "pass_in_steps": jacobi_pass / step}
