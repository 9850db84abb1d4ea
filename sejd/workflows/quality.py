"""Image-quality figures shared by `sejd check`, `sejd tune`, `sejd bench` and the studies."""

from __future__ import annotations

import math


def psnr_db(a, b) -> float:
    """PSNR of images in [-1, 1] (torch tensors) mapped to [0, 1]."""
    mse = float((((a - b) / 2) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def psnr_latents_db(a, ref) -> float:
    """PSNR of latents (a STARFlow's samples, unbounded): 20 log10(range of `ref` / RMSE of a against ref),
    the range being max - min of the reference over the whole batch."""
    rmse = float((a - ref).pow(2).mean().sqrt())
    return math.inf if rmse == 0 else 20 * math.log10(float(ref.max() - ref.min()) / rmse)


def quality_db(model, a, ref) -> float:
    """The PSNR that fits the model's samples: images in [-1, 1], or a STARFlow's latents."""
    return psnr_latents_db(a, ref) if hasattr(model.config, "text_block") else psnr_db(a, ref)
