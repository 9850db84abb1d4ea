"""The `tensorrt` backend: TensorRT engines built from the bundle's graphs, run behind BlockRunner.

Build (`sejd build BUNDLE --backend tensorrt [--precision fp32|fp16|bf16] [--workspace MiB]`): each
graph goes through Polygraphy's loaders: `NetworkFromOnnxPath` parses it into a strongly typed network
(the precision is in the graph: see `sejd.export.precision`), `CreateConfig` adds optimisation profiles
that all cover batch 1..batch_max and are tuned for different batch sizes (`trt_profiles`), the
workspace limit and the timing cache kept in the bundle (`engines/tensorrt-timing.cache`, reused by
later builds on the same platform), and `EngineBytesFromNetwork` builds the plan. What Polygraphy
lacks stays here: value ranges for the inputs TensorRT makes shape tensors, the timing cache written
atomically, the weight-stripped build and refit (below), and an engine manifest that records the
TensorRT version and the GPU the engines were built for: engines are refused elsewhere. The engines
replace engines/tensorrt only once every graph has been built.

Run: `TrtCall` turns one engine into a callable over device tensors (tensor addresses set with
`set_tensor_address`, `execute_async_v3` on PyTorch's current stream, output buffers allocated once
per input shape). `EngineBlockRunner` plugs those callables into the device runner, which keeps the
KV caches and iterates on the device and captures the single-token step (the `step_rows` engine +
in-place cache write), `jacobi` and `jacobi_k` as CUDA graphs; the loop engines (`jacobi_loop`,
`sequential_loop`: ONNX Loop, which CUDA graphs cannot capture) run as single calls.

Weight-stripped engines (`build_trt(strip_weights=True)`): each plan is built with
`BuilderFlag.STRIP_PLAN` (the refittable weights are left out of the serialised plan, which then
holds only kernels and tactics: the engines add little beside the bundle's weights) and
`BuilderFlag.REFIT_IDENTICAL` (the builder may still optimise for those exact weights, as the refit
supplies the same ones). When an engine is loaded, `refit_engine` fills it from the ONNX graph it was
built from: `trt.Refitter` over the engine, `trt.OnnxParserRefitter.refit_from_file` reading the graph
and its external data (the bundle's shared weight files, relative to the graph), then
`Refitter.refit_cuda_engine()`. fp32 engines refit from the bundle's own graphs; fp16/bf16 engines from
their reduced-precision graphs, which a stripped build keeps in engines/tensorrt/onnx/ (one shared
weight file per block, half the fp32 size). The manifest's `refit_sources` names each plan's graph.
This needs TensorRT >= 10 and a GPU, and was not run where this was written (no GPU there).

No TensorRT object is created unless PyTorch sees a CUDA device (`TensorRTBackend.available` in
`sejd.engines.backends` checks it first).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

import torch

from sejd.core.errors import SejdError
from sejd.core.files import (
    atomic_dir,
    atomic_write,
    folder_with,
    scratch_dir,
    write_json,
)
from sejd.core.util import progress
from sejd.engines.backends import EngineBackend, cuda_device_reason, register
from sejd.engines.device_runner import EngineBlockRunner, cuda_graphs_default
from sejd.engines.manifest import engine_dir, engine_file
from sejd.export.bundle import Bundle, BundleError, sha256_file
from sejd.export.contracts import contract, profile_shapes
from sejd.runtime.runner import KVCachePool

BACKEND = "tensorrt"
MIN_VERSION = 10  # the name-based I/O API (set_tensor_address, execute_async_v3)
TIMING_CACHE = "tensorrt-timing.cache"
REFIT_ONNX = "onnx"  # engines/tensorrt/onnx/: the reduced-precision graphs a stripped build refits from
_LOGGER = None


def unavailable_reason() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return "the tensorrt package is not installed (pip install 'sejd[tensorrt]' on a CUDA machine)"
    if int(trt.__version__.split(".")[0]) < MIN_VERSION:
        return f"TensorRT {trt.__version__} is too old: sejd needs TensorRT >= {MIN_VERSION}"
    return None


def _logger():
    import tensorrt as trt

    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def plan_file(rel_onnx: str) -> str:
    return rel_onnx[:-len(".onnx")] + ".plan"


def this_platform() -> dict:
    """What serialised engines are tied to: the TensorRT version and the GPU model."""
    import tensorrt as trt

    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def platform_mismatch(built: dict, here: dict) -> str | None:
    """None when engines built on `built` can run `here`, else a sentence saying what differs."""
    diffs = [f"{k} {built.get(k)!r} (here: {here[k]!r})" for k in ("tensorrt", "gpu", "compute_capability")
             if built.get(k) != here[k]]
    return None if not diffs else "engines were built for " + ", ".join(diffs)


def shape_input_values(num_tokens: int) -> dict[str, tuple]:
    """(min, opt, max) values of the scalar inputs TensorRT may treat as shape tensors (host inputs that
    shapes depend on: the Loop trip count, positions)."""
    T = num_tokens
    return {"max_iters": (0, T - 1, T - 1), "pos": (0, T // 2, T - 1), "start": (0, 0, T - 1)}


def profile_batches(batch_max: int) -> list[int]:
    """One profile tuned for batch 1 (latency) and one for batch_max (throughput); both cover 1..batch_max."""
    return sorted({1, batch_max})


def trt_profiles(c, batch_max: int, num_tokens: int, shape_tensors=()) -> list:
    """Polygraphy `Profile`s for graph contract `c`, one per `profile_batches` entry: the contract's (min,
    opt, max) shape of every input with a symbolic axis, and the value range of each input that TensorRT
    reads on the host as a shape tensor (`shape_tensors`: known only once the network is parsed)."""
    from polygraphy.backend.trt import Profile

    values = shape_input_values(num_tokens)
    unknown = sorted(set(shape_tensors) - set(values))
    if unknown:
        raise SejdError(f"TensorRT treats inputs {unknown} of the {c.variant} graph as shape tensors; sejd knows "
                        f"value ranges only for {sorted(values)}")
    profiles = []
    for opt in profile_batches(batch_max):
        profile = Profile()
        for name, (lo, mid, hi) in profile_shapes(c, batch_max, opt, num_tokens).items():
            profile.add(name, lo, mid, hi)
        for name in shape_tensors:  # 0-d inputs: their values, as one-element lists
            lo, mid, hi = values[name]
            profile.add(name, [lo], [mid], [hi])
        profiles.append(profile)
    return profiles


def network_loader(trt, onnx_path: Path):
    """Polygraphy's ONNX parser as a loader. Strongly typed: every tensor's type, so the precision, comes
    from the graph (`sejd.export.precision`). TensorRT 10 needs the flag; TensorRT 11 is always strongly
    typed and may no longer have it. `trt`: the tensorrt module (read for the flag only)."""
    from polygraphy.backend.trt import NetworkFromOnnxPath

    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    return NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)


def config_loader(trt, profiles: list, workspace_mib: int | None, timing_cache, strip_weights: bool):
    """Polygraphy's `CreateConfig` for one graph. `timing_cache`: an open file holding a timing cache from
    this platform, or None to start an empty one (a file object, not a path: Polygraphy would leave a lock
    file beside a path). No precision flags (the network is strongly typed); TF32 off, because fp32 engines
    are held to 1e-4 against fp32 PyTorch. `strip_weights`: the plan leaves out the refittable weights
    (STRIP_PLAN); the caller adds REFIT_IDENTICAL, which CreateConfig has no option for."""
    from polygraphy.backend.trt import CreateConfig

    limits = {trt.MemoryPoolType.WORKSPACE: int(workspace_mib) << 20} if workspace_mib else None
    return CreateConfig(profiles=profiles, tf32=False, load_timing_cache=timing_cache, memory_pool_limits=limits,
                        strip_plan=strip_weights)


def _shape_tensors(network) -> list[str]:
    return [network.get_input(i).name for i in range(network.num_inputs) if network.get_input(i).is_shape_tensor]


def _build_one(trt, onnx_path: Path, c, batch_max: int, num_tokens: int, workspace_mib, timing_cache,
               strip_weights: bool = False) -> tuple[bytes, bytes | None]:
    """One engine through Polygraphy's loaders: the parsed network, its config, EngineBytesFromNetwork.
    Returns the serialised plan and the updated timing cache (written by the caller, atomically)."""
    from polygraphy.backend.trt import EngineBytesFromNetwork
    from polygraphy.exception import PolygraphyException

    try:
        builder, network, parser = network_loader(trt, onnx_path)()
        create = config_loader(trt, trt_profiles(c, batch_max, num_tokens, _shape_tensors(network)), workspace_mib,
                               timing_cache, strip_weights)
        config = create(builder, network)  # called here, not by the builder loader: its timing cache is read below
        if strip_weights:  # see the module docstring: refitted from the ONNX graph when loaded
            config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
        engine = EngineBytesFromNetwork((builder, network, parser), config=config)()
    except PolygraphyException as e:  # parser errors and build failures: Polygraphy logged the details
        raise SejdError(f"TensorRT could not build an engine from {onnx_path.name}: {e} (see the log above)") from None
    timing = config.get_timing_cache()
    return bytes(engine), None if timing is None else bytes(memoryview(timing.serialize()))


@contextlib.contextmanager
def _polygraphy_log():
    """Polygraphy's log on stderr (results stay alone on stdout): warnings and errors, everything with -v."""
    from polygraphy.logger import G_LOGGER

    debug = logging.getLogger("sejd").isEnabledFor(logging.DEBUG)
    with contextlib.redirect_stdout(sys.stderr), G_LOGGER.verbosity(G_LOGGER.INFO if debug else G_LOGGER.WARNING):
        yield


def build_trt(bundle: Bundle, precision: str = "fp32", workspace_mib: int | None = None,
              show_progress: bool = True, strip_weights: bool = False) -> Path:
    import tensorrt as trt

    from sejd.export.precision import precision_graphs

    batch_max = bundle.batch_max
    T = bundle.config.num_tokens
    platform = this_platform()
    cache, cache_meta = timing_cache_files(bundle)  # beside the engines: kept when a build fails
    files, refit_sources = {}, {}
    # reduced-precision graphs go to a marked scratch folder beside the engines: removed on SIGTERM, and by
    # the next build if this one is killed
    with atomic_dir(engine_dir(bundle, BACKEND), replace=folder_with("manifest.json")) as out, \
            scratch_dir(engine_dir(bundle, BACKEND).parent, f"{BACKEND}-onnx") as scratch:
        kept = out / REFIT_ONNX if strip_weights else scratch  # a stripped engine's weights come from here
        sources = precision_graphs(bundle, precision, kept, show_progress)
        for g in progress(bundle.manifest["graphs"], desc=f"build tensorrt {precision}", enabled=show_progress):
            c = contract(bundle.config, g["variant"], bundle.unroll)
            usable = _same_platform(cache_meta, platform) and cache.exists()
            with (open(cache, "rb") if usable else contextlib.nullcontext()) as timing_in, _polygraphy_log():
                engine, timing = _build_one(trt, Path(sources[g["file"]]), c, batch_max, T, workspace_mib,
                                            timing_in, strip_weights)
            rel = plan_file(g["file"])
            if strip_weights:  # bundle-relative; a kept graph by where the engine folder will be
                src = Path(sources[g["file"]])
                refit_sources[rel] = (f"engines/{BACKEND}/{src.relative_to(out).as_posix()}" if src.is_relative_to(out)
                                      else src.relative_to(bundle.path).as_posix())
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(engine)
            files[rel] = sha256_file(out / rel)
            if timing is not None:  # ours, atomic: Polygraphy's save_timing_cache rewrites the file in place
                with atomic_write(cache) as tmp:
                    Path(tmp).write_bytes(timing)
                write_json(cache_meta, platform)
        if strip_weights:  # the kept reduced-precision graphs and weights are verified like the plans
            files.update({f.relative_to(out).as_posix(): sha256_file(f) for f in sorted(kept.rglob("*"))
                          if f.is_file()})
        manifest = {"backend": BACKEND, "bundle_manifest_sha256": bundle.manifest_sha256, "precision": precision,
                    **platform, "profile_batches": profile_batches(batch_max), "batch_max": batch_max,
                    "workspace_mib": workspace_mib, "timing_cache": str(cache.relative_to(bundle.path)),
                    "files": files, "refit_sources": refit_sources}
        write_json(out / "manifest.json", manifest)
    return engine_dir(bundle, BACKEND)


def _same_platform(cache_meta: Path, platform: dict) -> bool:
    """Whether the kept timing cache was measured on this TensorRT and GPU (else the build starts afresh)."""
    try:
        return json.loads(cache_meta.read_text()) == platform
    except (OSError, ValueError):  # none yet, or unreadable: not evidence of this platform
        return False


def refit_engine(engine, onnx_path: Path, what: str) -> None:
    """Fill a weight-stripped engine's weights from the ONNX graph it was built from."""
    import tensorrt as trt

    refitter = trt.Refitter(engine, _logger())
    parser = trt.OnnxParserRefitter(refitter, _logger())
    if not parser.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
        raise BundleError(f"TensorRT could not refit the weight-stripped engine {what} from {onnx_path}; "
                          f"rebuild the engines")


def timing_cache_files(bundle: Bundle) -> tuple[Path, Path]:
    """The TensorRT timing cache kept in the bundle, and the platform it was measured on."""
    cache = bundle.path / "engines" / TIMING_CACHE
    return cache, cache.with_name(TIMING_CACHE + ".json")


def load_trt_manifest(bundle: Bundle) -> dict:
    """engines/tensorrt/manifest.json, verified (built from this bundle on this platform, files unchanged)."""
    return TENSORRT.engine_manifest(bundle)


def _torch_dtype(trt_dtype):
    import tensorrt as trt

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
    return table[trt_dtype]


class TrtCall:
    """One engine as a callable: device tensors in contract order -> output tensors (fresh copies).

    Inputs are validated against the contract once per shape signature, before the engine runs.
    Output buffers are allocated once per signature (the latest MAX_SIGNATURES are kept), so a CUDA
    graph captured around a call keeps valid addresses. `epoch` counts reconfigurations of the
    execution context (new input shapes or profile): graphs captured before are recaptured. Inputs
    and outputs that TensorRT reads or writes on the host (shape tensors) get host buffers. The
    optimisation profile tuned nearest to the batch is selected."""

    MAX_SIGNATURES = 8

    def __init__(self, engine, c, profile_batches_: list[int]):
        import collections

        self.engine, self.c, self.profile_batches = engine, c, profile_batches_
        self.context = engine.create_execution_context()
        self.profile = None
        self.epoch = 0
        self.host_io = {n for n in c.input_names + c.output_names if engine.is_shape_inference_io(n)}
        self._buffers: collections.OrderedDict = collections.OrderedDict()  # signature -> output buffers
        self._host: dict = {}
        self._signature = None

    def _dtype(self, name):
        return _torch_dtype(self.engine.get_tensor_dtype(name))

    def _bind_inputs(self, inputs):
        for name, t in zip(self.c.input_names, inputs):
            if name in self.host_io:
                self._host[name] = t.to("cpu", self._dtype(name))  # kept alive until the next call
                self.context.set_tensor_address(name, self._host[name].data_ptr())
            else:
                self.context.set_tensor_address(name, t.data_ptr())

    def _configure(self, inputs, signature, stream: int):
        if signature not in self._buffers:
            self.c.validate(dict(zip(self.c.input_names, inputs)))
        batch = inputs[0].shape[0] if inputs[0].dim() else 1
        profile = min(range(len(self.profile_batches)), key=lambda i: abs(self.profile_batches[i] - batch))
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, stream)
            self.profile = profile
        for name, t in zip(self.c.input_names, inputs):
            self.context.set_input_shape(name, tuple(t.shape))
        self._bind_inputs(inputs)  # shape-tensor values first: output shapes may depend on them
        if signature not in self._buffers:
            self._buffers[signature] = [
                torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtype(n),
                            device="cpu" if n in self.host_io else "cuda") for n in self.c.output_names]
            while len(self._buffers) > self.MAX_SIGNATURES:
                self._buffers.popitem(last=False)
        self._buffers.move_to_end(signature)
        for name, buf in zip(self.c.output_names, self._buffers[signature]):
            self.context.set_tensor_address(name, buf.data_ptr())
        self._signature = signature
        self.epoch += 1

    def __call__(self, *inputs):
        stream = torch.cuda.current_stream().cuda_stream  # the capture stream while a CUDA graph records
        inputs = [t.contiguous() for t in inputs]
        signature = tuple((tuple(t.shape), t.dtype) for t in inputs)
        if signature != self._signature:
            self._configure(inputs, signature, stream)
        else:
            self._bind_inputs(inputs)
        if not self.context.execute_async_v3(stream):
            raise SejdError(f"TensorRT failed to run the {self.c.variant} engine (see the log above)")
        return tuple(o.clone() for o in self._buffers[signature])


class TrtEngines:
    """A bundle's TensorRT engines, deserialised lazily (one per graph used)."""

    def __init__(self, bundle: Bundle):
        import tensorrt as trt

        self.bundle, self.manifest = bundle, load_trt_manifest(bundle)
        self.runtime = trt.Runtime(_logger())
        self._calls: dict = {}

    def call(self, variant: str, block: int | None) -> TrtCall:
        key = (variant, block)
        if key not in self._calls:
            rel = plan_file(self.bundle.graph(variant, block)["file"])
            path = engine_file(self.bundle, BACKEND, rel, self.manifest)  # listed, inside the bundle
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise BundleError(f"TensorRT could not load engines/tensorrt/{rel}; rebuild the engines")
            source = self.manifest.get("refit_sources", {}).get(rel)
            if source:  # a weight-stripped plan: its weights come from the graph it was built from
                from sejd.export.bundle import confined_file
                where = engine_dir(self.bundle, BACKEND) / "manifest.json"
                refit_engine(engine, confined_file(self.bundle.path, source, "refit_sources", where),
                             f"engines/tensorrt/{rel}")
            c = contract(self.bundle.config, variant, self.bundle.unroll)
            self._calls[key] = TrtCall(engine, c, self.manifest["profile_batches"])
        return self._calls[key]


def trt_runners(bundle: Bundle, cuda_graphs: bool | None = None) -> list[EngineBlockRunner]:
    """One runner per block: TensorRT engines with the device runner's caches and CUDA graphs."""
    engines = TrtEngines(bundle)
    model = bundle.load_model().to("cuda")  # host-side glue (prior, permutations) on the device
    graphs = cuda_graphs_default() if cuda_graphs is None else cuda_graphs
    pool = KVCachePool()  # one per set of runners: freed with them, shared by their blocks
    return [EngineBlockRunner(lambda v, k=k: engines.call(v, k), bundle.variants(), bundle.unroll, model, k, graphs,
                              pool=pool)
            for k in range(bundle.config.num_blocks)]


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
        return unavailable_reason()

    def build(self, bundle, precision="fp32", threads=None, workspace=None, strip_weights=False):
        self.require()
        return build_trt(bundle, precision=precision, workspace_mib=workspace, strip_weights=strip_weights)

    def _runners(self, bundle, precision, threads):
        return trt_runners(bundle)

    def check_manifest(self, manifest):
        self.require()  # this_platform() asks TensorRT and the GPU
        return platform_mismatch(manifest, this_platform())

    def polygraphy_runner(self, bundle, model=None, precision="fp32"):
        from sejd.engines.polygraphy_runners import trt_engine_runner

        self.require()
        return trt_engine_runner(bundle)


TENSORRT = register(TensorRTBackend())
