"""One object per backend kind; `backend("torch-cuda:bf16")` finds it and the precision it runs at.

A backend is named `NAME` or, for torch-cuda, `NAME:PRECISION` (`torch-cuda:bf16`); engine backends
(ort-*, tensorrt) take their precision from `sejd build --precision`, recorded with the engines.

Every backend answers the same questions: can it run here (`available()`: None, or why not in one
sentence), how are its engines built (`build`; the PyTorch backends need no build), its block runners
(`runners`), the precision it computes in (`precision`), whether built engines fit this runtime and
platform (`check_manifest`), and, for `sejd check`, which graphs it compares, the Polygraphy runner it
compares them with and the `polygraphy run` arguments that rerun one outside sejd.

GPU packages are imported only inside these methods, so `import sejd` works everywhere, and no TensorRT
object is created unless PyTorch sees a CUDA device (creating a TensorRT runtime without a GPU can crash
the process).
"""

from __future__ import annotations

import importlib

from sejd.core.errors import BackendUnavailable, SejdError


def cuda_device_reason() -> str | None:
    """None when PyTorch sees a CUDA device, else why not."""
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device visible to PyTorch {torch.__version__} (CPU build or no GPU)"
    return None


def model_of(source):
    """The TarFlow model of a bundle, or `source` itself when it is one."""
    return source.load_model() if hasattr(source, "load_model") else source


class Backend:
    """The PyTorch reference (`torch`): the model in fp32 on the CPU, and the base of every backend."""

    name = "torch"
    reference = True  # the PyTorch reference itself: sampling needs no block runners, `sejd check` no graphs
    needs_build = False  # engine backends: `sejd build` writes engines/NAME/ before they run
    takes_precision = False  # only torch-cuda takes a NAME:PRECISION suffix
    polygraphy_flags: tuple = ("--onnxrt",)  # the runner `polygraphy run` reruns a graph on

    def available(self) -> str | None:
        """None when this backend can run here, else a sentence saying why not."""
        return None

    def require(self) -> None:
        """Raise BackendUnavailable, saying why, when this backend cannot run here."""
        reason = self.available()
        if reason:
            raise BackendUnavailable(f"backend {self.name} not available: {reason}")

    def build(self, bundle, precision: str = "fp32", threads: int | None = None, workspace: int | None = None,
              strip_weights: bool = False):
        """`sejd build`: the engine folder written for `bundle`."""
        raise SejdError(f"backend {self.name!r} needs no build step (it runs the bundle's PyTorch model directly)")

    def runners(self, source, precision: str = "fp32", threads: int | None = None) -> list:
        """One BlockRunner per block of `source` (a bundle, or a TarFlow model for the PyTorch backends)."""
        self.require()
        return self._runners(source, precision, threads)

    def _runners(self, source, precision, threads):
        from sejd.runtime.torch_runner import torch_runners

        return torch_runners(model_of(source))

    def precision(self, bundle, spec_precision: str) -> str:
        """What this backend computes in, given the precision of its spec (torch-cuda's suffix)."""
        return spec_precision

    def check_manifest(self, manifest: dict) -> str | None:
        """None when engines with this manifest can run here, else a sentence saying what differs."""
        return None

    def checked_graphs(self, bundle, config) -> tuple[list[dict], list[dict]]:
        """(every graph, the graphs `sejd check` can compare one by one): the reference has none."""
        return [], []

    def polygraphy_runner(self, bundle, model=None, precision: str = "fp32"):
        """A function (graph entry, contract) -> the Polygraphy runner `sejd check` compares the graph with."""
        raise SejdError(f"backend {self.name} is the PyTorch reference itself: it has no graphs to compare")

    def polygraphy_args(self, bundle, g: dict) -> list[str]:
        """The graph file and runner flags with which `polygraphy run` reruns graph `g` outside sejd."""
        return [str(bundle.path / g["file"]), *self.polygraphy_flags]


class EngineBackend(Backend):
    """A backend that runs engines built by `sejd build` into engines/NAME/, at the build's precision."""

    reference = False
    needs_build = True

    def __init__(self, name: str):
        self.name = name

    def engine_manifest(self, bundle) -> dict:
        """engines/NAME/manifest.json, verified against the bundle, this runtime (check_manifest) and its files."""
        from sejd.engines.manifest import read_engine_manifest

        return read_engine_manifest(bundle, self.name, self.check_manifest)

    def precision(self, bundle, spec_precision):
        from sejd.engines.manifest import engine_dir, engine_manifest

        manifest = engine_manifest(bundle, self.name)
        precision = manifest.get("precision", "fp32") if manifest is not None else "fp32"
        if not isinstance(precision, str):
            from sejd.export.bundle import BundleError
            raise BundleError(f"{engine_dir(bundle, self.name) / 'manifest.json'}: precision must be a string such "
                              f"as 'fp16', got {precision!r}")
        return precision

    def checked_graphs(self, bundle, config):
        return bundle.manifest["graphs"], bundle.manifest["graphs"]


# name -> the module that registers it (imported on first use: GPU packages stay unimported, and the
# registry imports no implementation statically: they import it and call `register`)
IMPLEMENTATIONS = {"torch": __name__, "ort-cpu": "sejd.engines.ort", "ort-cuda": "sejd.engines.ort",
                   "ort-trt": "sejd.engines.ort", "tensorrt": "sejd.engines.tensorrt",
                   "torch-cuda": "sejd.engines.torch_cuda"}
_REGISTERED: dict[str, Backend] = {}


def register(found: Backend) -> Backend:
    """Called by each implementation module for the backends it provides."""
    assert found.name in IMPLEMENTATIONS, found.name
    _REGISTERED[found.name] = found
    return found


def _find(name: str) -> Backend:
    if name not in _REGISTERED:
        importlib.import_module(IMPLEMENTATIONS[name])
    return _REGISTERED[name]


def registry() -> dict[str, Backend]:
    """Every backend, by name, in the order `sejd --help` lists them."""
    return {name: _find(name) for name in IMPLEMENTATIONS}


register(Backend())


def backend(spec: str) -> tuple[Backend, str]:
    """'torch-cuda:bf16' -> (the torch-cuda Backend, 'bf16'); a plain name -> (its Backend, 'fp32')."""
    from sejd.export.graphs import precision_dtype

    name, colon, precision = str(spec).partition(":")
    if name not in IMPLEMENTATIONS:
        raise SejdError(f"unknown backend {spec!r}; expected one of {tuple(IMPLEMENTATIONS)} (torch-cuda may carry a "
                        f"precision: torch-cuda:fp16, torch-cuda:bf16)")
    found = _find(name)
    if colon and name == "torch":
        raise SejdError(f"backend {spec!r}: the PyTorch reference runs in fp32; for reduced precision use "
                        f"torch-cuda:{precision or 'fp16'} on a GPU, or build engines with --precision")
    if colon and not found.takes_precision:
        raise SejdError(f"backend {spec!r}: only torch-cuda takes a precision suffix; engine backends are built "
                        f"at a precision (sejd build BUNDLE --backend {name} --precision {precision or 'fp16'})")
    if colon and not precision:
        raise SejdError(f"backend {spec!r}: empty precision; expected torch-cuda:fp32, :fp16 or :bf16")
    precision_dtype(precision or "fp32")  # validates the suffix
    return found, precision or "fp32"
