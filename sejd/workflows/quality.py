"""Image-quality figures shared by `sejd check`, `sejd tune`, `sejd bench` and the studies."""

from __future__ import annotations

import math


def psnr_db(a, b) -> float:
    """PSNR of images in [-1, 1] (torch tensors) mapped to [0, 1]."""
    mse = float((((a - b) / 2) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
