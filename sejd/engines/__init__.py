"""Backends that run a bundle's graphs behind the BlockRunner interface.

GPU backends import their packages only when used, so `import sejd` works everywhere; where a
backend cannot run, `unavailable(backend)` says why in one sentence.

A backend is named `NAME` or, for torch-cuda, `NAME:PRECISION` (`torch-cuda:bf16`); engine backends
(ort-*, tensorrt) take their precision from `sejd build --precision`, recorded with the engines.
"""

from __future__ import annotations

from sejd.errors import SejdError

BACKENDS = ("torch", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "torch-cuda")
ENGINE_BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "tensorrt")  # need `sejd build`


def split_backend(spec: str) -> tuple[str, str]:
    """'torch-cuda:bf16' -> ('torch-cuda', 'bf16'); a plain name -> (name, 'fp32')."""
    from sejd.export.graphs import precision_dtype

    name, colon, precision = str(spec).partition(":")
    if name not in BACKENDS:
        raise SejdError(f"unknown backend {spec!r}; expected one of {BACKENDS} (torch-cuda may carry a "
                        f"precision: torch-cuda:fp16, torch-cuda:bf16)")
    if colon and name == "torch":
        raise SejdError(f"backend {spec!r}: the PyTorch reference runs in fp32; for reduced precision use "
                        f"torch-cuda:{precision or 'fp16'} on a GPU, or build engines with --precision")
    if colon and name != "torch-cuda":
        raise SejdError(f"backend {spec!r}: only torch-cuda takes a precision suffix; engine backends are built "
                        f"at a precision (sejd build BUNDLE --backend {name} --precision {precision or 'fp16'})")
    if colon and not precision:
        raise SejdError(f"backend {spec!r}: empty precision; expected torch-cuda:fp32, :fp16 or :bf16")
    precision_dtype(precision or "fp32")  # validates the suffix
    return name, precision or "fp32"


def cuda_device_reason() -> str | None:
    """None when PyTorch sees a CUDA device, else why not. Checked before any GPU object is created
    (creating a TensorRT runtime without a GPU can crash the process)."""
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device visible to PyTorch {torch.__version__} (CPU build or no GPU)"
    return None


def unavailable(backend: str) -> str | None:
    name, _ = split_backend(backend)
    if name == "torch":
        return None
    if name.startswith("ort-"):
        from sejd.engines.ort import unavailable_reason
        return unavailable_reason(name)
    reason = cuda_device_reason()
    if reason:
        return reason
    if name == "tensorrt":
        from sejd.engines.tensorrt import unavailable_reason
        return unavailable_reason()
    return None  # torch-cuda


def require(backend: str) -> None:
    """Raise BackendUnavailable, saying why, when `backend` cannot run here."""
    from sejd.engines.ort import BackendUnavailable

    reason = unavailable(backend)
    if reason:
        raise BackendUnavailable(f"backend {backend} not available: {reason}")


def runners_for(bundle, backend: str, threads: int | None = None):
    """One BlockRunner per block of `bundle` on `backend` (engines must have been built)."""
    name, precision = split_backend(backend)
    if name == "torch":
        from sejd.runtime.torch_runner import torch_runners
        return torch_runners(bundle.load_model())
    require(backend)
    if name == "torch-cuda":
        from sejd.engines.torch_graphs import graph_runners
        return graph_runners(bundle.load_model().to("cuda"), precision=precision)
    if name == "tensorrt":
        from sejd.engines.tensorrt import trt_runners
        return trt_runners(bundle)
    from sejd.engines.ort import ort_runners
    return ort_runners(bundle, name, threads)


def build_engines(bundle, backend: str, options):
    """`sejd build`: engines for an engine backend; options: precision, threads, workspace (MiB),
    strip_weights (TensorRT)."""
    name, _ = split_backend(backend)
    if name not in ENGINE_BACKENDS:
        raise SejdError(f"backend {backend!r} needs no build step (it runs the bundle's PyTorch model directly)")
    require(name)
    precision = getattr(options, "precision", None) or "fp32"
    if name == "tensorrt":
        from sejd.engines.tensorrt import build_trt
        return build_trt(bundle, precision=precision, workspace_mib=getattr(options, "workspace", None),
                         strip_weights=getattr(options, "strip_weights", False))
    from sejd.engines.ort import build_ort
    return build_ort(bundle, name, threads=getattr(options, "threads", None), precision=precision)


def engine_precision(bundle, backend: str) -> str:
    """The precision the backend computes in: the build's for engine backends, the suffix for torch-cuda."""
    name, precision = split_backend(backend)
    if name not in ENGINE_BACKENDS:
        return precision
    manifest = engine_manifest(bundle, name)
    precision = manifest.get("precision", "fp32") if manifest is not None else "fp32"
    if not isinstance(precision, str):
        from sejd.bundle import BundleError
        raise BundleError(f"{engine_dir(bundle, name) / 'manifest.json'}: precision must be a string such as "
                          f"'fp16', got {precision!r}")
    return precision


def engine_dir(bundle, backend: str):
    return bundle.path / "engines" / backend


def engine_manifest(bundle, backend: str) -> dict | None:
    """engines/BACKEND/manifest.json as a checked object (its `files` table well formed; the files themselves
    are verified by read_engine_manifest); None when no engines were built."""
    from sejd.bundle import check_file_table, read_json_object

    mf = engine_dir(bundle, backend) / "manifest.json"
    if not mf.exists():
        return None
    m = read_json_object(mf, f"the {backend} engine manifest")
    check_file_table(m, mf)
    return m


def engine_file(bundle, backend: str, rel: str, manifest: dict):
    """The engine file `rel` of engines/BACKEND, which its manifest must list, confined to the bundle."""
    from sejd.bundle import confined_file

    where = engine_dir(bundle, backend) / "manifest.json"
    if rel not in manifest["files"]:
        from sejd.bundle import BundleError
        raise BundleError(f"{where}: engine file {rel} is not listed in the engine manifest's files; "
                          f"{_rebuild(bundle, backend)}")
    # confined to the bundle, not to engines/BACKEND, so that a symlinked engines folder cannot leave it
    return confined_file(bundle.path, f"engines/{backend}/{rel}", "engine file", where,
                         remedy=_rebuild(bundle, backend))


def _rebuild(bundle, backend: str) -> str:
    return f"rebuild them with `sejd build {bundle.path} --backend {backend}`"


def read_engine_manifest(bundle, backend: str, runtime_mismatch) -> dict:
    """engines/BACKEND/manifest.json, verified: built from this export of the bundle, for a runtime that
    `runtime_mismatch(manifest)` accepts (None, else a sentence saying what differs), every file unchanged."""
    from sejd.bundle import BundleError, sha256_file

    rebuild = _rebuild(bundle, backend)
    mf = engine_dir(bundle, backend) / "manifest.json"
    m = engine_manifest(bundle, backend)
    if m is None:
        raise BundleError(f"{bundle.path}: no {backend} engines; build them with `sejd build {bundle.path} "
                          f"--backend {backend}`")
    if m.get("bundle_manifest_sha256") != bundle.manifest_sha256:
        raise BundleError(f"{mf}: engines were built from another export of this bundle; {rebuild}")
    mismatch = runtime_mismatch(m)
    if mismatch:
        raise BundleError(f"{mf}: {mismatch}; {rebuild}")
    for rel, digest in m["files"].items():
        if sha256_file(engine_file(bundle, backend, rel, m)) != digest:
            raise BundleError(f"{bundle.path}: engine file engines/{backend}/{rel} is missing or changed; {rebuild}")
    return m
