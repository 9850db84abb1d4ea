"""Backends that run a bundle's graphs behind the BlockRunner interface.

GPU backends import their packages only when used, so `import sejd` works everywhere; where a
backend cannot run, `unavailable(backend)` says why in one sentence.
"""

from __future__ import annotations

from sejd.errors import SejdError

BACKENDS = ("torch", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "torch-cuda")


def cuda_device_reason() -> str | None:
    """None when PyTorch sees a CUDA device, else why not. Checked before any GPU object is created
    (creating a TensorRT runtime without a GPU can crash the process)."""
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device visible to PyTorch {torch.__version__} (CPU build or no GPU)"
    return None


def unavailable(backend: str) -> str | None:
    if backend not in BACKENDS:
        raise SejdError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return None
    if backend.startswith("ort-"):
        from sejd.engines.ort import unavailable_reason
        return unavailable_reason(backend)
    reason = cuda_device_reason()
    if reason:
        return reason
    if backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "the tensorrt package is not installed (pip install 'sejd[tensorrt]' on a CUDA machine)"
        return "the tensorrt runner is not implemented yet in this version of sejd"
    return None  # torch-cuda


def runners_for(bundle, backend: str, threads: int | None = None):
    """One BlockRunner per block of `bundle` on `backend` (engines must have been built)."""
    from sejd.engines.ort import BackendUnavailable

    if backend == "torch":
        from sejd.runtime.torch_runner import torch_runners
        return torch_runners(bundle.load_model())
    reason = unavailable(backend)
    if not reason and backend == "torch-cuda":
        from sejd.engines.torch_graphs import graph_runners
        return graph_runners(bundle.load_model().to("cuda"))
    if reason:
        raise BackendUnavailable(f"backend {backend} not available: {reason}")
    from sejd.engines.ort import ort_runners
    return ort_runners(bundle, backend, threads)


def build_engines(bundle, backend: str, options):
    from sejd.engines.ort import PROVIDERS, BackendUnavailable, build_ort

    reason = unavailable(backend)
    if reason:
        raise BackendUnavailable(f"backend {backend} not available: {reason}")
    if backend in PROVIDERS:
        return build_ort(bundle, backend, threads=getattr(options, "threads", None))
    raise SejdError(f"backend {backend!r} needs no build step (it runs the bundle's PyTorch model directly)")
