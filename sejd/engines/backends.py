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

from sejd.errors import BackendUnavailable, SejdError


def cuda_device_reason() -> str | None:
    """None when PyTorch sees a CUDA device, else why not."""
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device visible to PyTorch {torch.__version__} (CPU build or no GPU)"
    return None


def _model(source):
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

        return torch_runners(_model(source))

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


class TorchCudaBackend(Backend):
    """`torch-cuda[:PRECISION]`: the export graph modules in PyTorch on the GPU, with CUDA graphs
    (sejd/engines/torch_cuda.py); `sejd check` compares the modules (rerun as the bundle's ONNX graphs)."""

    name = "torch-cuda"
    reference = False
    takes_precision = True

    def available(self):
        return cuda_device_reason()

    def _runners(self, source, precision, threads):
        from sejd.engines.torch_cuda import graph_runners

        return graph_runners(_model(source).to("cuda"), precision=precision)

    def checked_graphs(self, bundle, config):
        from sejd.engines.polygraphy_runners import MODULE_VARIANTS
        from sejd.export.contracts import BLOCK_VARIANTS

        every = bundle.manifest["graphs"] if bundle is not None else \
            [{"block": k, "variant": v} for k in range(config.num_blocks) for v in BLOCK_VARIANTS]
        return every, [g for g in every if g["variant"] in MODULE_VARIANTS]

    def polygraphy_runner(self, bundle, model=None, precision="fp32"):
        """`model`: the model on the device (the runners'), else the bundle's, moved there."""
        from sejd.engines.polygraphy_runners import module_runner

        self.require()
        model = bundle.load_model().to("cuda") if model is None else model
        return lambda g, c: module_runner(model, g["block"], c, precision)


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
            from sejd.bundle import BundleError
            raise BundleError(f"{engine_dir(bundle, self.name) / 'manifest.json'}: precision must be a string such "
                              f"as 'fp16', got {precision!r}")
        return precision

    def checked_graphs(self, bundle, config):
        return bundle.manifest["graphs"], bundle.manifest["graphs"]


class OrtBackend(EngineBackend):
    """`ort-cpu`, `ort-cuda`, `ort-trt`: ONNX Runtime with one execution provider (sejd/engines/ort.py)."""

    def __init__(self, name: str, polygraphy_flags: tuple):
        super().__init__(name)
        self.polygraphy_flags = polygraphy_flags

    def available(self):
        from sejd.engines.ort import unavailable_reason

        return unavailable_reason(self.name)

    def build(self, bundle, precision="fp32", threads=None, workspace=None, strip_weights=False):
        from sejd.engines import ort  # build_ort says itself when the provider is missing

        return ort.build_ort(bundle, self.name, threads=threads, precision=precision)

    def _runners(self, bundle, precision, threads):
        from sejd.engines.ort import ort_runners

        return ort_runners(bundle, self.name, threads)

    def check_manifest(self, manifest):
        import onnxruntime as ort

        built = manifest.get("onnxruntime")
        return None if built == ort.__version__ else \
            f"engines were built with onnxruntime {built}, this is {ort.__version__}"

    def polygraphy_runner(self, bundle, model=None, precision="fp32"):
        from sejd.engines.polygraphy_runners import ort_engine_runner

        self.require()
        return ort_engine_runner(bundle, self.name)

    def polygraphy_args(self, bundle, g):  # the built engine itself
        from sejd.engines.manifest import engine_dir

        return [str(engine_dir(bundle, self.name) / g["file"]), *self.polygraphy_flags]


class TensorRTBackend(EngineBackend):
    """`tensorrt`: TensorRT engines (sejd/engines/tensorrt.py), pinned to the TensorRT version and GPU
    they were built on; `polygraphy run` rebuilds from the bundle's ONNX graph."""

    polygraphy_flags = ("--trt",)

    def __init__(self):
        super().__init__("tensorrt")

    def available(self):
        reason = cuda_device_reason()  # first: no TensorRT object without a GPU
        if reason:
            return reason
        from sejd.engines.tensorrt import unavailable_reason

        return unavailable_reason()

    def build(self, bundle, precision="fp32", threads=None, workspace=None, strip_weights=False):
        from sejd.engines.tensorrt import build_trt

        self.require()
        return build_trt(bundle, precision=precision, workspace_mib=workspace, strip_weights=strip_weights)

    def _runners(self, bundle, precision, threads):
        from sejd.engines.tensorrt import trt_runners

        return trt_runners(bundle)

    def check_manifest(self, manifest):
        from sejd.engines.tensorrt import platform_mismatch, this_platform

        self.require()  # this_platform() asks TensorRT and the GPU
        return platform_mismatch(manifest, this_platform())

    def polygraphy_runner(self, bundle, model=None, precision="fp32"):
        from sejd.engines.polygraphy_runners import trt_engine_runner

        self.require()
        return trt_engine_runner(bundle)


REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend(), OrtBackend("ort-cpu", ("--onnxrt",)), OrtBackend("ort-cuda", ("--onnxrt", "--providers", "cuda")),
    OrtBackend("ort-trt", ("--onnxrt", "--providers", "tensorrt", "cuda")), TensorRTBackend(), TorchCudaBackend())}


def backend(spec: str) -> tuple[Backend, str]:
    """'torch-cuda:bf16' -> (the torch-cuda Backend, 'bf16'); a plain name -> (its Backend, 'fp32')."""
    from sejd.export.graphs import precision_dtype

    name, colon, precision = str(spec).partition(":")
    if name not in REGISTRY:
        raise SejdError(f"unknown backend {spec!r}; expected one of {tuple(REGISTRY)} (torch-cuda may carry a "
                        f"precision: torch-cuda:fp16, torch-cuda:bf16)")
    found = REGISTRY[name]
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
