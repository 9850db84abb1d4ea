"""Backends that run a bundle's graphs behind the BlockRunner interface: one object per backend kind in
`sejd.engines.backends` (`backend(spec)` finds it, with the precision of the spec); what is left here
names them and the files of built engines.

A backend is named `NAME` or, for torch-cuda, `NAME:PRECISION` (`torch-cuda:bf16`); engine backends
(ort-*, tensorrt) take their precision from `sejd build --precision`, recorded with the engines.
"""

from __future__ import annotations

from sejd.engines.backends import backend
from sejd.engines.manifest import (
    engine_dir,
    engine_file,
    engine_manifest,
    read_engine_manifest,
)

__all__ = ["backend", "engine_dir", "engine_file", "engine_manifest", "read_engine_manifest", "unavailable"]


def unavailable(spec: str) -> str | None:
    """None when the backend can run here, else a sentence saying why not (for scripts: one call)."""
    return backend(spec)[0].available()
