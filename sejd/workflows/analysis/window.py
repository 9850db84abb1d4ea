"""Attention windows: the grid of windows measured, and a block temporarily run with one."""

from __future__ import annotations

import contextlib

from sejd.core.errors import InputError
from sejd.model.tarflow import MetaBlock


def window_grid(num_tokens: int, quick: bool = False) -> list[int]:
    """1, 2, 4, ... (quick: 1, 4, 16, ...) below T, then T itself (the exact model)."""
    step = 4 if quick else 2
    grid, w = [], 1
    while w < num_tokens:
        grid.append(w)
        w *= step
    return grid + [num_tokens]


@contextlib.contextmanager
def windowed(block: MetaBlock, window: int, num_tokens: int):
    """Run `block` with attention window `window` inside the context; a window >= T is the exact model."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise InputError(f"an attention window must be an int >= 1 (tokens), got {window!r}")
    saved = block.window
    block.window = None if window >= num_tokens else window
    try:
        yield block
    finally:
        block.window = saved
