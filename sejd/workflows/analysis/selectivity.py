"""Predicted selectivity: the decoder each block would get from the measurements alone, and how it
compares with a plan `sejd tune` chose by timing."""

from __future__ import annotations

RULE = ("a block is Jacobi (from zeros, at the largest tau of the grid whose profile reaches the PSNR "
        "target) when its iterations to that tau, each costing `pass_in_steps` sequential steps on this "
        "backend and batch, cost less than the T-1 steps of sequential decoding; otherwise sequential. "
        "Redundancy alone (by_window) predicts sequential for a block that needs a window >= T/4")


def predict(num_tokens: int, redundancy: dict, profile: dict, pass_in_steps: float) -> dict:
    """The rule above; `by_window` is the redundancy-only prediction, reported beside it."""
    tau = profile["tau_for_target"]
    iterations = None if tau is None else profile["iterations_to_tau"][profile["taus"].index(tau)]
    jacobi_cost = None if iterations is None else iterations * pass_in_steps  # in steps
    decoder = "jacobi" if jacobi_cost is not None and jacobi_cost < num_tokens - 1 else "sequential"
    return {"decoder": decoder, "tau": tau if decoder == "jacobi" else None, "iterations": iterations,
            "jacobi_cost_in_steps": jacobi_cost, "sequential_cost_in_steps": num_tokens - 1,
            "by_window": "sequential" if redundancy["window"] >= num_tokens / 4 else "jacobi"}


def agreement(predicted: dict, tuned_decoder: str) -> dict:
    """Whether a tuned block's decoder agrees with the prediction and with the redundancy-only one.
    GS-Jacobi is a parallel decoder: it agrees with a Jacobi prediction on the decoder kind."""
    kind = "sequential" if tuned_decoder == "sequential" else "jacobi"
    return {"agree": kind == predicted["decoder"], "agree_by_window": kind == predicted["by_window"]}
