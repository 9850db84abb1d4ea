"""Small shared helpers: atomic file writes, progress bars, image grids."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, binary: bool = False):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    Nothing half-written is ever visible under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the result is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside `path`; it replaces `path` (a folder, if any) only if the block
    succeeds: the old folder is moved aside, the new one moved in, then the old one deleted."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, data) -> Path:
    """Write `data` as indented JSON, atomically."""
    import json

    path = Path(path)
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1) + "\n")
    return path


def progress(iterable=None, total=None, desc=None, enabled=True, **kw):
    """A tqdm progress bar on stderr, or the plain iterable when disabled."""
    if not enabled:
        return iterable if iterable is not None else _NullBar()
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True, **kw)


class _NullBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
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
    with atomic_write(path, binary=True) as tmp:
        grid_image(images, nrow, scale).save(tmp, format="PNG")
    return path
