"""Small shared helpers: progress bars and image grids (files are written through `sejd.core.files`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from sejd.core.files import atomic_write


def progress_shown(enabled: bool = True) -> bool:
    """Bars only when the caller wants them, stderr is a terminal (logs get no carriage-return frames) and
    SEJD_PROGRESS is not "0" (set by the CLI's --no-progress)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(enabled and isatty is not None and isatty() and os.environ.get("SEJD_PROGRESS") != "0")


def progress(iterable=None, total=None, desc=None, enabled=True, **kw):
    """A tqdm progress bar on stderr where `progress_shown(enabled)`, else a silent stand-in with the same use."""
    if not progress_shown(enabled):
        return _NullBar(iterable)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True, **kw)


class _NullBar:
    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable if self.iterable is not None else ())

    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def set_postfix_str(self, *a, **k):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def grid_image(images, nrow: int | None = None, scale: int = 1):
    """images (N, C, H, W) in [-1, 1] (torch or numpy) -> one PIL image, 1 px gaps."""
    import numpy as np
    from PIL import Image

    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    n, c, h, w = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    pad = 1
    grid = np.ones((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = \
            (x[i] + 1) / 2
    arr = (np.clip(grid, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def grid_png_bytes(images, nrow: int | None = None, scale: int = 1) -> bytes:
    import io

    buf = io.BytesIO()
    grid_image(images, nrow, scale).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images, path: str | os.PathLike, nrow: int | None = None, scale: int = 1) -> Path:
    """images (N, C, H, W) in [-1, 1] -> one PNG grid, written atomically."""
    path = Path(path)
    with atomic_write(path) as tmp:
        grid_image(images, nrow, scale).save(tmp, format="PNG")
    return path
