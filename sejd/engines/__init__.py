"""Backends that run a bundle's graphs behind the BlockRunner interface: one object per backend kind
in `sejd.engines.backends`; the names and functions here serve callers that hold a backend spec string.

A backend is named `NAME` or, for torch-cuda, `NAME:PRECISION` (`torch-cuda:bf16`); engine backends
(ort-*, tensorrt) take their precision from `sejd build --precision`, recorded with the engines.
"""

from __future__ import annotations

from sejd.engines.backends import REGISTRY, backend
from sejd.engines.manifest import engine_dir, engine_file, engine_manifest, read_engine_manifest

__all__ = ["BACKENDS", "ENGINE_BACKENDS", "backend", "build_engines", "engine_dir", "engine_file", "engine_manifest",
           "engine_precision", "read_engine_manifest", "require", "runners_for", "split_backend", "unavailable"]

BACKENDS = tuple(REGISTRY)
ENGINE_BACKENDS = tuple(name for name, b in REGISTRY.items() if b.needs_build)  # need `sejd build`


def split_backend(spec: str) -> tuple[str, str]:
    """'torch-cuda:bf16' -> ('torch-cuda', 'bf16'); a plain name -> (name, 'fp32')."""
    found, precision = backend(spec)
    return found.name, precision


def unavailable(spec: str) -> str | None:
    """None when the backend can run here, else a sentence saying why not."""
    return backend(spec)[0].available()


def require(spec: str) -> None:
    """Raise BackendUnavailable, saying why, when the backend cannot run here."""
    backend(spec)[0].require()


def runners_for(bundle, spec: str, threads: int | None = None):
    """One BlockRunner per block of `bundle` on the backend (engines must have been built)."""
    found, precision = backend(spec)
    return found.runners(bundle, precision, threads)


def build_engines(bundle, spec: str, options):
    """`sejd build`: engines for an engine backend; options: precision, threads, workspace (MiB),
    strip_weights (TensorRT)."""
    return backend(spec)[0].build(bundle, precision=getattr(options, "precision", None) or "fp32",
                                  threads=getattr(options, "threads", None),
                                  workspace=getattr(options, "workspace", None),
                                  strip_weights=getattr(options, "strip_weights", False))


def engine_precision(bundle, spec: str) -> str:
    """The precision the backend computes in: the build's for engine backends, the suffix for torch-cuda."""
    found, precision = backend(spec)
    return found.precision(bundle, precision)
