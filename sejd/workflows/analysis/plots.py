"""Figures of `sejd analyze` (matplotlib, imported only here): redundancy against window, the Jacobi
profile against iteration, and a one-look summary; each written atomically as PNG."""

from __future__ import annotations

import math
from pathlib import Path

from sejd.core.files import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    _pyplot().close(fig)
    return Path(path)


def _finish(fig, axes, xlabel: str | None, title: str, path) -> Path:
    """Axis labels and legends, the title, then the file."""
    for ax in axes:
        if xlabel:
            ax.set_xlabel(xlabel)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _label(b: dict) -> str:
    return f"blocks[{b['block']}] (#{b['order']})"


def _finite(xs, ys):
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_redundancy(result: dict, path) -> Path:
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    tol = result["tolerances"]
    for b in result["blocks"]:
        r = b["redundancy"]
        a1.plot(*_finite(r["windows"], r["nll_increase"]), marker="o", label=_label(b))
        a2.plot(*_finite(r["windows"], r["psnr_db"]), marker="o", label=_label(b))
    a1.axhline(tol["nll_nats_per_dim"], color="k", ls="--", lw=0.8, label="tolerance")
    a2.axhline(tol["psnr_db"], color="k", ls="--", lw=0.8, label="tolerance")
    a1.set_yscale("symlog", linthresh=1e-3)
    a1.set_ylabel("NLL increase (nats/dim), only this block windowed")
    a2.set_ylabel("PSNR of the block's decoding vs exact (dB)")
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
    return _finish(fig, (a1, a2), "attention window w (tokens)",
                   f"dependency redundancy per block ({result['source']}, T = {result['num_tokens']})", path)


def plot_profile(result: dict, path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    target = result["tolerances"]["psnr_db"]
    for b in result["blocks"]:
        p = b["jacobi"]
        its = list(range(1, len(p["residual"]) + 1))
        axes[0].semilogy(*_finite(its, [max(r, 1e-12) for r in p["residual"]]), label=_label(b))
        axes[1].plot(*_finite(its, p["psnr_db"]), label=_label(b))
        front = p["front"]
        axes[2].plot(its, front["first_moving_token"][-1], label=_label(b))
    axes[1].axhline(target, color="k", ls="--", lw=0.8, label="target")
    axes[0].set_ylabel("residual max|x_t - x_(t-1)|")
    axes[1].set_ylabel("PSNR vs exact decoding (dB)")
    axes[2].set_ylabel(f"first token moving by >= {result['blocks'][0]['jacobi']['front']['taus'][-1]}")
    return _finish(fig, axes, "Jacobi iteration",
                   f"Jacobi convergence per block from zeros ({result['source']}, batch {result['batch']})", path)


def plot_summary(result: dict, path) -> Path:
    plt = _pyplot()
    T = result["num_tokens"]
    blocks = result["blocks"]
    names = []
    for b in blocks:
        tuned = b["tuned"]["decoder"] if b["tuned"] else "-"
        names.append(f"{_label(b)}\npredicted {b['predicted']['decoder']}\ntuned {tuned}")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8))
    a1.bar(names, [b["redundancy"]["window"] for b in blocks], color="tab:blue")
    a1.axhline(T / 4, color="k", ls="--", lw=0.8, label="T/4: redundancy alone says sequential from here")
    a1.set_yscale("log", base=2)
    a1.set_ylim(0.5, 2 * T)  # a window of 1 stays visible
    a1.set_ylabel("needed attention window (tokens)")
    a1.set_title("dependency redundancy (smaller = more redundant)")
    iters = [b["predicted"]["iterations"] or T - 1 for b in blocks]
    a2.bar(names, iters, color="tab:orange")
    steps = result["cost"]["pass_in_steps"]
    a2.axhline((T - 1) / steps, color="k", ls="--", lw=0.8,
               label=f"break-even: a pass costs {steps:.2f} steps; sequential above")
    a2.set_ylabel(f"Jacobi iterations to {result['tolerances']['psnr_db']:g} dB")
    a2.set_title("Jacobi convergence")
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelsize=7)
    return _finish(fig, (a1, a2), None, f"{result['source']}: sampling order left to right; agreement with the "
                   f"tuned plan {result['summary']['agreement'] or 'n/a (no tuned plan)'}", path)


def plot_all(result: dict, path) -> list[Path]:
    """`path` gets the summary; PATH_redundancy.png and PATH_profile.png the two detailed figures."""
    path = Path(path)
    stem = path.with_suffix("")
    return [plot_summary(result, path), plot_redundancy(result, f"{stem}_redundancy.png"),
            plot_profile(result, f"{stem}_profile.png")]
