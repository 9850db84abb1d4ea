"""Jacobi convergence profile of one block: parallel iterations from zeros on the block's exact input,
recorded at every iteration against the block's exact sequential decoding."""

from __future__ import annotations

import torch

from sejd.workflows.analysis.trace import block_psnr

EXACT_TOL = 1e-4  # a token counts as exact when within this of sequential decoding (float round-off)


def _first(mask: torch.Tensor) -> int:
    """Index of the first True in a 1-D bool tensor, or its length when there is none."""
    hits = torch.nonzero(mask)
    return int(hits[0]) if len(hits) else int(mask.shape[0])


def jacobi_profile(runner, trace_block, cond, taus, target_db: float, bar=None) -> dict:
    """Iterate until the residual is below every tau of the grid and the PSNR target is met (at most
    T-1 iterations, when the iterate is exact). Per iteration t (1-based, lists start at t = 1):
    residual = max |x^t - x^(t-1)| over the unknown tokens and the batch; psnr_db against exact
    decoding; exact_prefix = tokens 0.. that equal exact decoding (within EXACT_TOL), at least t+1;
    front[tau] = the first token still moving by >= tau (T when none)."""
    z, exact = trace_block.z, trace_block.exact
    T = runner.num_tokens
    runner.begin(z.shape[0], cond)
    x = torch.zeros_like(z)
    x[:, 0] = z[:, 0]
    residuals, psnrs, prefix, fronts = [], [], [], {tau: [] for tau in taus}
    while len(residuals) < T - 1:
        x_next, residual = runner.jacobi_iter(z, x)
        change = (x_next - x).abs().amax(dim=(0, 2))  # per token, over the batch and the token's width
        residuals.append(float(residual.max()))
        psnrs.append(block_psnr(x_next, exact))
        prefix.append(_first((x_next - exact).abs().amax(dim=(0, 2)) > EXACT_TOL))
        for tau in taus:
            fronts[tau].append(_first(change >= tau))
        x = x_next
        if bar is not None:
            bar.update(1)
        if residuals[-1] < min(taus) and psnrs[-1] >= target_db:
            break
    to_tau = [next((t for t, r in enumerate(residuals, 1) if r < tau), None) for tau in taus]
    at_tau = [None if t is None else psnrs[t - 1] for t in to_tau]
    reaching = [tau for tau, p in zip(taus, at_tau) if p is not None and p >= target_db]
    return {"residual": residuals, "psnr_db": psnrs, "exact_prefix": prefix,
            "front": {"taus": list(taus), "first_moving_token": [fronts[tau] for tau in taus]},
            "taus": list(taus), "iterations_to_tau": to_tau, "psnr_db_at_tau": at_tau,
            "iterations_to_target": next((t for t, p in enumerate(psnrs, 1) if p >= target_db), None),
            "tau_for_target": max(reaching) if reaching else None}
