"""Backends that run a bundle's graphs behind the BlockRunner interface."""

from __future__ import annotations

BACKENDS = ("torch", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "torch-cuda")


def runners_for(bundle, backend: str, threads: int | None = None):
    """One BlockRunner per block of `bundle` on `backend` (engines must have been built)."""
    from sejd.errors import SejdError

    if backend == "torch":
        from sejd.runtime.torch_runner import torch_runners
        return torch_runners(bundle.load_model())
    if backend.startswith("ort-"):
        from sejd.engines.ort import PROVIDERS, ort_runners
        if backend in PROVIDERS:
            return ort_runners(bundle, backend, threads)
    raise SejdError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def build_engines(bundle, backend: str, options):
    from sejd.errors import SejdError

    raise SejdError(f"backend {backend!r} cannot be built here; expected ort-cpu, ort-cuda or ort-trt")
