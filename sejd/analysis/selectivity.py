"""Predicted selectivity: the decoder each block would get from the measurements alone, and how it
compares with a plan `sejd tune` chose by timing."""

from __future__ import annotations

RULE = ("a block is sequential when it needs a window >= T/4 (low dependency redundancy) or when its "
        "Jacobi profile needs more than T/8 iterations to reach the target at the tau that reaches it; "
        "otherwise it is Jacobi from zeros at the largest tau of the grid whose profile reaches the target")


def predict(num_tokens: int, redundancy: dict, profile: dict) -> dict:
    """The rule above, with each of its two signals reported on its own."""
    tau = profile["tau_for_target"]
    iterations = None if tau is None else profile["iterations_to_tau"][profile["taus"].index(tau)]
    by_window = "sequential" if redundancy["window"] >= num_tokens / 4 else "jacobi"
    by_profile = "sequential" if iterations is None or iterations > num_tokens / 8 else "jacobi"
    decoder = "sequential" if "sequential" in (by_window, by_profile) else "jacobi"
    return {"decoder": decoder, "tau": tau if decoder == "jacobi" else None, "iterations": iterations,
            "by_window": by_window, "by_profile": by_profile}


def compare(predicted: dict, tuned) -> dict | None:
    """Agreement of a prediction with one block of a tuned plan (a BlockPlan), or None without a plan.
    GS-Jacobi is a parallel decoder: it agrees with a Jacobi prediction on the decoder kind."""
    if tuned is None:
        return None
    kind = "sequential" if tuned.decoder == "sequential" else "jacobi"
    return {"decoder": tuned.decoder, "tau": None if tuned.decoder == "sequential" else tuned.tau,
            "variant": tuned.variant, "agree": kind == predicted["decoder"],
            "agree_by_window": kind == predicted["by_window"], "agree_by_profile": kind == predicted["by_profile"]}
