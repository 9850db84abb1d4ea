"""ONNX Runtime engines: build (optimise and save every graph for a provider) and run (block runners).

`ort-cpu` is always available; `ort-cuda` and `ort-trt` need onnxruntime-gpu (the `gpu` extra).
KV caches live in preallocated ping-pong buffers bound with IO binding: a step reads the caches of
the previous step and writes the other pair, so caches are never copied or reallocated. Both sets
are views of one KV-cache pool per model (`OrtSessions.pool`), shared by every block's runner.
On ort-cpu, single tokens run the fused step graph that `sejd build` ships per block where it passes
parity (sejd/engines/ort_fused_step.py: it writes the token's keys/values into the current caches in
place), else the exported `step_rows` graph (the host writes them); where the native step is used
(sejd/engines/native.py) it replaces both.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from sejd.core.errors import SejdError
from sejd.core.files import atomic_dir, folder_with, scratch_dir
from sejd.core.util import progress
from sejd.engines.backends import EngineBackend, register
from sejd.engines.manifest import engine_dir, engine_file
from sejd.engines.ort_fused_step import FUSED_VARIANT
from sejd.export.bundle import Bundle, BundleError, sha256_file
from sejd.export.contracts import block_dims, block_specs, contract, profile_shapes
from sejd.runtime.runner import BlockRunner, Conditioning, KVCachePool

PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
}


GPU_BACKENDS = ("ort-cuda", "ort-trt")
log = logging.getLogger("sejd.ort")


def _shape_string(shapes: dict, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(map(str, s[which]))}" for name, s in shapes.items())


def providers(bundle: Bundle, backend: str, graph: dict | None = None, root: Path | None = None) -> list:
    """Execution providers with their options, for one of the bundle's graphs. ort-trt: explicit
    optimisation profiles (batch 1..batch_max, tuned for batch 1) and an engine and timing cache per
    graph under engines/ort-trt/trt_cache/ (the provider keys cached engines by file name and graph
    structure, not by weights: every block's graph has the same of both, so they must not share one).
    `root`: the engine folder (default engines/BACKEND; a scratch folder while building)."""
    if backend == "ort-cpu":
        return PROVIDERS[backend]
    import torch

    device = str(torch.cuda.current_device()) if torch.cuda.is_available() else "0"
    cuda = ("CUDAExecutionProvider", {"device_id": device})
    if backend == "ort-cuda":
        return [cuda]
    trt = {"device_id": device, "trt_engine_cache_enable": "True", "trt_timing_cache_enable": "True"}
    if graph is not None:
        cache = str(Path(root or engine_dir(bundle, backend)) / "trt_cache" / graph["file"][:-len(".onnx")])
        trt.update({"trt_engine_cache_path": cache, "trt_timing_cache_path": cache})
        c = contract(bundle.config, graph["variant"], bundle.unroll, block=graph["block"])
        shapes = profile_shapes(c, bundle.batch_max, 1, bundle.config.num_tokens)
        if shapes:
            trt.update({"trt_profile_min_shapes": _shape_string(shapes, 0),
                        "trt_profile_opt_shapes": _shape_string(shapes, 1),
                        "trt_profile_max_shapes": _shape_string(shapes, 2)})
    return [("TensorrtExecutionProvider", trt), cuda]


SINGLE_TOKEN_VARIANTS = ("step_present", "step_rows", "sequential_loop", "step_fused")
FUSED_PATH, STEP_ROWS_PATH = "fused ONNX step graph", "ONNX step_rows graph"  # BlockRunner.single_token_path
SMALL_PASS_TOKENS = 2048  # rows x tokens up to which a parallel pass runs faster on one CPU thread


def unavailable_reason(backend: str) -> str | None:
    """None when `backend` can run here, else a sentence saying why not."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed (pip install 'sejd[cpu]', or 'sejd[gpu]' on a CUDA machine)"
    have = ort.get_available_providers()
    missing = [p for p in PROVIDERS[backend] if p not in have]
    if missing:
        return (f"onnxruntime {ort.__version__} has no {', '.join(missing)} (available: {', '.join(have)}); "
                f"install onnxruntime-gpu (pip install 'sejd[gpu]', after uninstalling onnxruntime) on a CUDA machine")
    return None


def session_options(threads: int | None = None, optimized_path: Path | None = None, level: str = "all"):
    """`optimized_path`: save the optimised graph there, its initializers over INLINE_MAX_BYTES in
    `<name>.data` beside it (ONNX Runtime's optimised-model external initializers), so no optimised graph
    is ever one protobuf over 2 GB and `build_ort` can share the weights between graphs."""
    import onnxruntime as ort

    from sejd.export.weights import INLINE_MAX_BYTES

    so = ort.SessionOptions()
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one request at a time: latency, not throughput
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    Path(optimized_path).name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                    str(INLINE_MAX_BYTES + 1))
    return so


def _share_weights(graph: Path, rel: str, store) -> None:
    """Move the weights of the ONNX file `graph` (inline or external beside it) into the engine folder's
    content-addressed store (one weight file per block, shared by its variants where tensors are equal)
    and save its topology at store.root/rel; ONNX Runtime's own per-graph `.data` file is removed."""
    import onnx

    from sejd.export.weights import WEIGHTS_FILE, save_external

    model = onnx.load(str(graph), load_external_data=False)
    store.target(str(Path(rel).parent / WEIGHTS_FILE) if "/" in rel else "forward.weights.bin")
    save_external(model, rel, store, base_dir=Path(graph).parent)
    ort_data = Path(graph).with_name(Path(graph).name + ".data")
    if ort_data.exists():
        ort_data.unlink()


def build_ort(bundle: Bundle, backend: str, threads: int | None = None, show_progress: bool = True,
              precision: str = "fp32") -> Path:
    """Optimise every graph for `backend` and save the optimised models plus an engine manifest.
    `precision` fp16/bf16: built from reduced-precision exports of the bundle's model (export/precision.py).
    Built in a scratch folder that replaces engines/BACKEND only when every graph has been built.
    Weights are stored once per block in the engine folder too (see `_share_weights`)."""
    import onnxruntime as ort

    from sejd.export.precision import precision_graphs
    from sejd.export.weights import WeightStore

    BACKENDS[backend].require()
    if bundle.family == "starflow" and precision != "fp32":
        raise SejdError(f"STARFlow bundles are built in fp32 only for now, got --precision {precision}")
    if backend == "ort-cpu" and precision == "bf16":
        raise SejdError("ONNX Runtime's CPU provider has no bf16 matrix product: build ort-cpu with --precision "
                        "fp16 or fp32, or bf16 on ort-cuda, ort-trt or tensorrt")
    files = {}
    # reduced-precision graphs go to a marked scratch folder beside the engines: removed on SIGTERM, and by
    # the next build if this one is killed
    with atomic_dir(engine_dir(bundle, backend), replace=folder_with("manifest.json")) as out, \
            scratch_dir(engine_dir(bundle, backend).parent, f"{backend}-onnx") as scratch:
        sources = precision_graphs(bundle, precision, scratch, show_progress)
        with WeightStore(out) as store:
            for g in progress(bundle.manifest["graphs"], desc=f"build {backend} {precision}", enabled=show_progress):
                target = out / g["file"]
                target.parent.mkdir(parents=True, exist_ok=True)
                opts = providers(bundle, backend, g, root=out)
                try:
                    if backend == "ort-trt":  # nodes compiled by TensorRT cannot be saved: keep the ONNX and fill
                        _share_weights(Path(sources[g["file"]]), g["file"], store)  # the graph's engine cache,
                        Path(opts[0][1]["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)  # as runs do
                        ort.InferenceSession(str(target), session_options(threads, level="none"), providers=opts)
                    else:
                        ort.InferenceSession(str(sources[g["file"]]), session_options(threads, target), providers=opts)
                        _share_weights(target, g["file"], store)
                except (SejdError, OSError):  # a full disk is not the graph's fault
                    raise
                except Exception as e:
                    raise SejdError(f"onnxruntime {ort.__version__} cannot build the {precision} {g['variant']} "
                                    f"graph for {backend}: {str(e).splitlines()[0]}") from None
                files[g["file"]] = sha256_file(target)
            fused = _fused_steps(bundle, backend, precision, out, store, scratch, threads, show_progress)
            if fused is not None:
                files.update(fused[0])
        files.update({rel: sha256_file(out / rel) for rel in store.files()})
        manifest = {"backend": backend, "bundle_manifest_sha256": bundle.manifest_sha256, "precision": precision,
                    "onnxruntime": ort.__version__, "providers": [p if isinstance(p, str) else p[0] for p in
                                                                  providers(bundle, backend)], "files": files,
                    "weights": {"weight_bytes": store.bytes_written, "deduplicated_bytes": store.bytes_deduplicated},
                    "settings": {"graph_optimization_level": "ORT_ENABLE_ALL", "execution_mode": "sequential",
                                 "intra_op_num_threads": threads or "default", "inter_op_num_threads": 1}}
        if fused is not None:
            manifest[FUSED_VARIANT] = fused[1]
        if backend == "ort-cpu":  # what will run single tokens here (re-decided at each load, and warned)
            manifest["single_token_path"] = _single_token_path_at_build(bundle, precision, fused)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return engine_dir(bundle, backend)


def _single_token_path_at_build(bundle, precision: str, fused) -> str:
    """The single-token path ort-cpu runners of these engines take on this machine, as the build sees it."""
    from sejd.engines import native

    reason = None if precision == "fp32" else f"engines built at {precision}"
    reason = reason or _native_unsupported(bundle.config) or native.available()
    if reason is None:
        return f"native CPU step ({native.level()})"
    used = [b for b in (fused[1].get("blocks", {}) if fused else {}).values() if b.get("used")]
    graph = "fused ONNX step graph" if used else "ONNX step_rows graph"
    return f"{graph} (native CPU step not used: {reason})"


def _fused_steps(bundle, backend, precision, out, store, scratch, threads, show_progress):
    """ort-cpu: the fused single-token step per block (sejd/engines/ort_fused_step.py), shipped where it passes
    parity -> (files, the manifest's record); built in fp32 only. None for the GPU providers."""
    from sejd.engines import ort_fused_step

    if backend != "ort-cpu":
        return None
    if precision != "fp32":
        return {}, ort_fused_step.not_built_record(bundle.config.num_blocks, f"engines built at {precision}: the "
                                                   f"fused step graph is built in fp32 only")
    return ort_fused_step.build_fused_steps(bundle, bundle.load_model(), out, store, scratch, threads, show_progress)


def load_engine_manifest(bundle: Bundle, backend: str) -> dict:
    """engines/BACKEND/manifest.json, verified (built from this bundle with this onnxruntime, files unchanged)."""
    return BACKENDS[backend].engine_manifest(bundle)


class OrtSessions:
    """Lazily created sessions over a bundle's built engines (one per graph actually used)."""

    def __init__(self, bundle: Bundle, backend: str = "ort-cpu", threads: int | None = None):
        BACKENDS[backend].require()
        self.bundle, self.backend, self.threads = bundle, backend, threads
        self.manifest = load_engine_manifest(bundle, backend)
        self._sessions: dict = {}
        self.pool = KVCachePool()  # blocks run one at a time: one set of caches for all of them

    def _fused_entry(self, block: int):
        """The build's record of block `block`'s fused step (a dict), or None where there is none."""
        record = self.manifest.get(FUSED_VARIANT)
        blocks = record.get("blocks") if isinstance(record, dict) else None
        entry = blocks.get(str(block)) if isinstance(blocks, dict) else None
        return entry if isinstance(entry, dict) else None

    def fused_step(self, block: int) -> str | None:
        """The engine file of block `block`'s fused step graph when the build shipped it, else None (engines
        of other backends or precisions, built before it existed, or a block whose graph failed parity)."""
        entry = self._fused_entry(block)
        if entry is None or entry.get("used") is not True:
            return None
        if not isinstance(entry.get("file"), str):
            raise BundleError(f"{engine_dir(self.bundle, self.backend) / 'manifest.json'}: {FUSED_VARIANT} of block "
                              f"{block} is marked used but names no file; rebuild the engines with `sejd build "
                              f"{self.bundle.path} --backend {self.backend}`")
        return entry["file"]

    def fused_reasons(self) -> dict[int, str]:
        """Per block without a shipped fused step, why not (the build's record, or that there is none)."""
        reasons = {}
        for k in range(self.bundle.config.num_blocks):
            if self.fused_step(k) is None:
                entry = self._fused_entry(k)
                reasons[k] = str(entry.get("reason", "not recorded")) if entry is not None else \
                    f"the {self.backend} engines have none (built before it existed, or for another backend)"
        return reasons

    def get(self, variant: str, block: int | None = None, single_thread: bool = False):
        """The session of one graph. `single_thread`: for latency-bound calls on the CPU (one token, or a
        small parallel pass), one intra-op thread beats a thread pool that synchronises after every op
        (measured: a sequential block 31 ms vs 36 ms at batch 1, 97 ms vs 112 ms at batch 16)."""
        import onnxruntime as ort

        threads = 1 if single_thread and self.backend == "ort-cpu" else self.threads
        key = (variant, block, threads)
        if key not in self._sessions:
            if variant == FUSED_VARIANT:
                rel = self.fused_step(block)
                if rel is None:
                    raise BundleError(f"the {self.backend} engines have no {FUSED_VARIANT} graph for block {block}")
                path = engine_file(self.bundle, self.backend, rel, self.manifest)
                session = ort.InferenceSession(str(path), session_options(threads, level="none"),
                                               providers=PROVIDERS[self.backend])
                if "guidance_table" not in {i.name for i in session.get_inputs()}:
                    raise BundleError(f"engines/{self.backend}/{rel} is not a {FUSED_VARIANT} graph (its inputs: "
                                      f"{[i.name for i in session.get_inputs()]}); rebuild the engines with "
                                      f"`sejd build {self.bundle.path} --backend {self.backend}`")
                self._sessions[key] = session
                return session
            rel = self.bundle.graph(variant, block)["file"]
            path = engine_file(self.bundle, self.backend, rel, self.manifest)  # listed, inside the bundle
            # already optimised at build time: do not optimise again
            session = ort.InferenceSession(str(path), session_options(threads, level="none"),
                                           providers=providers(self.bundle, self.backend,
                                                               self.bundle.graph(variant, block)))
            want = contract(self.bundle.config, variant, self.bundle.unroll, block=block)
            got = {i.name for i in session.get_inputs()}
            if got != set(want.input_names):  # e.g. another graph's file under this one's name and hash
                raise BundleError(f"{path}: not a {variant} graph of this bundle (inputs {sorted(got)}, its "
                                  f"contract declares {sorted(want.input_names)})")
            self._sessions[key] = session
        return self._sessions[key]


class OrtBlockRunner(BlockRunner):
    """One block on ONNX Runtime; fused variants map to single graph calls."""

    def __init__(self, sessions: OrtSessions, block: int):
        cfg = sessions.bundle.config
        self.sessions, self.k, self.cfg = sessions, block, cfg
        # the block's sizes: STARFlow's are per block (T + 1 runtime tokens, the text prefix's cache slots)
        self.dims = d = block_dims(cfg, block)
        self.num_tokens, self.token_dim = d.num_tokens, d.token_dim
        self.text_slots = d.text_length  # runtime position p is cache slot text_slots + p
        self._prefix: dict = {}
        self.unroll = sessions.bundle.unroll
        self.exported = set(sessions.bundle.variants())
        self.cache_names = [f"{l}.{kv}" for l in range(d.layers_per_block) for kv in ("key", "value")]
        self._caches: list[list[np.ndarray]] = []
        self._contracts = {}
        # the fused step graph's engine file when the build shipped it for this block (tests set None to run
        # step_rows instead)
        self.fused = sessions.fused_step(block)

    @property
    def one_call(self) -> frozenset:
        graphs = {"jacobi_chunk": "jacobi_k", "jacobi_loop": "jacobi_loop", "sequential_loop": "sequential_loop"}
        return frozenset(op for op, graph in graphs.items() if graph in self.exported)

    @property
    def single_token_path(self) -> str:
        """What runs single tokens: the fused step graph where the engines have it for this block, else the
        exported step graph. A subclass that runs them otherwise declares or sets its own."""
        if getattr(self, "_single_token_path", None) is not None:
            return self._single_token_path
        if self.fused is not None:
            return FUSED_PATH
        return STEP_ROWS_PATH if "step_rows" in self.exported else "ONNX step_present graph"

    @single_token_path.setter
    def single_token_path(self, value: str) -> None:
        self._single_token_path = value

    def _contract(self, variant):
        if variant not in self._contracts:
            self._contracts[variant] = contract(self.cfg, variant, self.unroll, block=self.k)
        return self._contracts[variant]

    def begin(self, batch: int, cond: Conditioning) -> None:
        batch_max = self.sessions.bundle.batch_max
        if batch > batch_max:
            from sejd.core.errors import InputError
            raise InputError(f"batch {batch} exceeds the bundle's batch_max {batch_max} (re-export with "
                             f"--batch-max {batch} to serve larger batches)")
        self.batch = batch
        d = self.dims
        # ml-starflow guides only the blocks with a text prefix; the others run the B conditional rows
        R = self.rows = cond.rows if d.guided_rows else batch
        use = cond.guidance is not None and d.guided_rows
        guidance = cond.guidance if use else torch.zeros(2, self.num_tokens)
        self.cond_feeds = {"temps": np.ascontiguousarray(cond.temps[:R].numpy().astype(np.float32)),
                           "guidance": np.ascontiguousarray(guidance.numpy().astype(np.float32))}
        if d.num_classes:
            self.cond_feeds["labels"] = np.ascontiguousarray(cond.labels[:R].numpy().astype(np.int64))
        shape = (R, d.num_heads, d.cache_tokens, d.head_dim)
        # the ping-pong pair, as numpy views of the shared pool (bindings below take their addresses)
        views = [t.numpy() for t in self.sessions.pool.caches(2 * len(self.cache_names), shape)]
        n = len(self.cache_names)
        self._caches = [views[:n], views[n:]]
        self._current = 0  # which buffer set holds the valid cache
        self._bindings: dict = {}
        self._validated: set = set()
        self._fused_calls: dict = {}  # per cache side: the fused step bound to it (made on first use)
        self._prefix = {}
        if d.text_length:
            self._begin_prefix(cond.text, R)

    def _begin_prefix(self, text, R: int) -> None:
        """A STARFlow text block: the `prefix` graph on the rows' text (cond rows, then uncond rows) fills the
        caches' slots [0, Lt) (both ping-pong sides) and is kept for the Jacobi graphs, which take it as inputs."""
        from sejd.core.errors import InputError

        d = self.dims
        want = (R, d.text_length, d.text_width)
        if not torch.is_tensor(text) or text.dim() != 3 or tuple(text.shape[1:]) != want[1:] or text.shape[0] < R:
            got = tuple(text.shape) if torch.is_tensor(text) else None if text is None else type(text).__name__
            raise InputError(f"block {self.k} is text-conditioned: the conditioning must hold text embeddings of "
                             f"shape {want} (rows: cond then uncond; text_length x text_width), got {got}")
        if "prefix" not in self.exported:
            raise BundleError("bundle lacks the 'prefix' graph that a STARFlow text block needs (re-export it)")
        out = self._run("prefix", {"text": np.ascontiguousarray(text[:R].numpy().astype(np.float32))})
        for i, name in enumerate(self.cache_names):
            kv = out[f"prefix.{name}"]
            for side in self._caches:
                side[i][:, :, :d.text_length] = kv
            self._prefix[f"prefix.{name}"] = np.ascontiguousarray(kv)

    def _session(self, variant: str):
        # single tokens and small parallel passes are latency-bound: one thread (see OrtSessions.get)
        small = variant in SINGLE_TOKEN_VARIANTS or self.rows * self.num_tokens <= SMALL_PASS_TOKENS
        return self.sessions.get(variant, self.k, single_thread=small)

    def _binding(self, variant: str, side: int | None, read_only: bool = False):
        """An IO binding with everything that is fixed between begin() calls already bound: conditioning,
        the cache pair of `side` as past and the other pair as present (ping-pong), ORT-allocated outputs."""
        key = (variant, side)  # the binding points at the caches of `side`: one per side
        if key not in self._bindings:
            c = self._contract(variant)
            binding = self._session(variant).io_binding()
            for name, arr in self.cond_feeds.items():
                if name in c.input_names:
                    binding.bind_cpu_input(name, arr)
            outputs = [n for n in c.output_names if not n.startswith("present.")]  # step_rows: new.* returned
            for name in outputs:  # bound first: get_outputs() lists outputs in binding order
                binding.bind_output(name, "cpu")
            if side is not None:
                for n, past, present in zip(self.cache_names, self._caches[side], self._caches[1 - side]):
                    binding.bind_cpu_input(f"past.{n}", past)
                    if not read_only:
                        binding.bind_output(f"present.{n}", "cpu", 0, np.float32, list(present.shape),
                                            present.ctypes.data)
            self._bindings[key] = (binding, outputs)
        return self._bindings[key]

    def _validate(self, variant: str, feeds: dict, with_caches: bool) -> None:
        """Check the per-call inputs against the variant's contract, once per shape, before the backend."""
        signature = (variant, tuple(v.shape for v in feeds.values()), tuple(v.dtype for v in feeds.values()))
        if signature not in self._validated:
            c = self._contract(variant)
            full = {**feeds, **{k: v for k, v in self.cond_feeds.items() if k in c.input_names}}
            if with_caches:
                full.update({f"past.{n}": a for n, a in zip(self.cache_names, self._caches[self._current])})
            c.validate(full)
            self._validated.add(signature)

    def _run(self, variant: str, feeds: dict, cache_io: bool | str = False) -> dict[str, np.ndarray]:
        """Run one graph; `feeds` holds only the per-call inputs (conditioning and caches are bound).

        cache_io: True = read the current caches and write the other pair (then they swap);
        "read" = read the current caches only (the caller updates them in place)."""
        feeds = {k: v if v.flags.c_contiguous else np.ascontiguousarray(v) for k, v in feeds.items()}
        self._validate(variant, feeds, bool(cache_io))
        binding, outputs = self._binding(variant, self._current if cache_io else None, cache_io == "read")
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        for name in outputs:  # fresh ORT allocation each run: window outputs change shape between calls
            binding.bind_output(name, "cpu")
        self._session(variant).run_with_iobinding(binding)
        if cache_io is True:
            self._current = 1 - self._current
        values = binding.get_outputs()
        return {name: values[i].numpy() for i, name in enumerate(outputs)}

    def step(self, x_tok, pos):
        if self.fused is None:
            return super().step(x_tok, pos)
        x = x_tok.numpy()
        # the inputs the step_rows graph would take, checked against its contract (once per shape)
        self._validate("step_rows", {"x": x[:, None], "pos": np.array(pos, np.int64)}, with_caches=True)
        if not 0 <= pos < self.num_tokens:
            from sejd.core.errors import InputError
            raise InputError(f"step: position must be in [0, {self.num_tokens}), got {pos}")
        xa, xb = self._fused_call()(x, pos)
        return torch.from_numpy(xa), torch.from_numpy(xb)

    def _fused_call(self):
        """The fused step bound to the current cache side (it writes the token's keys/values there in place)."""
        if self._current not in self._fused_calls:
            from sejd.engines import ort_fused_step as fs

            dims, f = fs.dims_of(self.cfg.block_spec), self.cond_feeds
            cond = fs.conditioning_inputs(dims, self.batch, f.get("labels"), f["temps"],
                                          f["guidance"] if self.rows == 2 * self.batch else None)
            self._fused_calls[self._current] = fs.FusedStep(self._session(FUSED_VARIANT), dims, self.batch, cond,
                                                            self._caches[self._current])
        return self._fused_calls[self._current]

    def project(self, x, start):
        n = x.shape[1]
        if n == 1 and self.fused is not None:
            xa, xb = self.step(x[:, 0], start)
            return xa[:, None], xb[:, None]
        if n == 1 and "step_rows" in self.exported:
            out = self._run("step_rows", {"x": x.numpy(), "pos": np.array(start, np.int64)}, cache_io="read")
            slot = self.text_slots + start
            for i, cache in enumerate(self._caches[self._current]):  # write this token's keys/values in place
                cache[:, :, slot] = out[f"new.{self.cache_names[i]}"][:, :, 0]
            return torch.from_numpy(out["xa"]), torch.from_numpy(out["xb"])
        variant = "step_present" if n == 1 else "window"
        if variant not in self.exported:
            raise BundleError(f"bundle lacks the {variant!r} graph that this decoder needs")
        pos = "pos" if n == 1 else "start"
        out = self._run(variant, {"x": x.numpy(), pos: np.array(start, np.int64)}, cache_io=True)
        return torch.from_numpy(out["xa"]), torch.from_numpy(out["xb"])

    def jacobi_iter(self, z, x, start=1, end=None):
        if start != 1 or (end or self.num_tokens) != self.num_tokens or "jacobi" not in self.exported:
            return super().jacobi_iter(z, x, start, end)
        out = self._run("jacobi", {"z": z.numpy(), "x": x.numpy(), **self._prefix})
        return torch.from_numpy(out["x_next"]), torch.from_numpy(out["residual"])

    def jacobi_chunk(self, z, x, k):
        if k != self.unroll or "jacobi_k" not in self.exported:
            return super().jacobi_chunk(z, x, k)
        out = self._run("jacobi_k", {"z": z.numpy(), "x": x.numpy(), **self._prefix})
        return torch.from_numpy(out["x_next"]), torch.from_numpy(out["residuals"])

    def jacobi_loop(self, z, x, tau, cap):
        if "jacobi_loop" not in self.exported:
            return super().jacobi_loop(z, x, tau, cap)
        out = self._run("jacobi_loop", {"z": z.numpy(), "x0": x.numpy(), "tau": np.array(tau, np.float32),
                                        "max_iters": np.array(cap, np.int64)})
        return torch.from_numpy(out["x"]), torch.from_numpy(out["residual"]), int(out["iterations"])

    def sequential_loop(self, z):
        if "sequential_loop" not in self.exported:
            return super().sequential_loop(z)
        return torch.from_numpy(self._run("sequential_loop", {"z": z.numpy()})["x"])


_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_}


class OrtTensorCall:
    """One session as a callable over torch tensors in contract order -> output tensors, bound with IO
    binding to the tensors' own memory: on a CUDA provider inputs and outputs never leave the device.

    The contract is checked once per input signature, before the backend runs. ONNX Runtime runs on
    its own CUDA stream, so PyTorch's stream is synchronised before each call (ORT synchronises its
    own at the end of a run)."""

    def __init__(self, session, c):
        self.session, self.c = session, c
        self._dims: dict = {}

    def __call__(self, *inputs):
        inputs = [t.contiguous() for t in inputs]
        signature = tuple((tuple(t.shape), t.dtype) for t in inputs)
        if signature not in self._dims:
            self._dims[signature] = self.c.validate(dict(zip(self.c.input_names, inputs)))
        dims, dev = self._dims[signature], inputs[0].device
        outputs = [torch.empty(spec.resolve(dims), dtype=getattr(torch, spec.dtype), device=dev)
                   for spec in self.c.outputs]
        binding = self.session.io_binding()
        index = dev.index or 0
        for name, t in zip(self.c.input_names, inputs):
            binding.bind_input(name, dev.type, index, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        for spec, o in zip(self.c.outputs, outputs):
            binding.bind_output(spec.name, dev.type, index, _NUMPY[o.dtype], tuple(o.shape), o.data_ptr())
        if dev.type == "cuda":
            torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        return tuple(outputs)


def ort_tensor_runners(bundle: Bundle, backend: str, device: str, threads: int | None = None):
    """Block runners whose KV caches and iterates live on `device` ("cuda" for ort-cuda/ort-trt; "cpu"
    runs the same code on ort-cpu in the tests), over OrtTensorCall. CUDA graphs are not captured
    around ONNX Runtime calls: ORT launches its work on its own stream."""
    import functools

    from sejd.engines.device_runner import EngineBlockRunner

    sessions = OrtSessions(bundle, backend, threads)
    model = bundle.load_model().to(device)

    @functools.lru_cache(maxsize=None)
    def call(variant, k):
        return OrtTensorCall(sessions.get(variant, k), contract(bundle.config, variant, bundle.unroll, block=k))

    pool = KVCachePool()  # one per set of runners: freed with them, shared by their blocks
    return [EngineBlockRunner(lambda v, k=k: call(v, k), bundle.variants(), bundle.unroll, model, k, cuda_graphs=False,
                              pool=pool)
            for k in range(bundle.config.num_blocks)]


_WARNED: set = set()  # fallback reasons already warned about in this process


def ort_runners(bundle: Bundle, backend: str = "ort-cpu", threads: int | None = None):
    if backend in GPU_BACKENDS:
        return ort_tensor_runners(bundle, backend, "cuda", threads)
    sessions = OrtSessions(bundle, backend, threads)
    reason = native_step_reason(sessions)
    if reason:
        runners = [OrtBlockRunner(sessions, k) for k in range(bundle.config.num_blocks)]
        _warn_no_native_step(reason, runners)
        return runners
    from sejd.engines import native

    model = bundle.load_model()
    native.set_threads(threads)
    runners = [native.NativeStepRunner(sessions, k, block) for k, block in enumerate(model.blocks)]
    for r in runners:
        r.model = model  # the Source reuses it rather than loading the checkpoint again
    return runners


def _warn_no_native_step(reason: str, runners: list) -> None:
    """One warning per process and reason that ort-cpu's single tokens do not run in the native step, naming
    the graph that runs them instead (later runners of the same reason log it at info level)."""
    paths: dict[str, list[int]] = {}
    for k, r in enumerate(runners):
        paths.setdefault(r.single_token_path, []).append(k)
    instead = " and the ".join(p if len(paths) == 1 else f"{p} (blocks {', '.join(map(str, ks))})"
                               for p, ks in paths.items())
    missing = runners[0].sessions.fused_reasons()
    if missing:
        which = "" if len(missing) == len(runners) else f" for blocks {', '.join(map(str, missing))}"
        instead += f"; no fused step graph{which}: {'; '.join(sorted(set(missing.values())))}"
    message = "ort-cpu: the native CPU step is not used (%s); single tokens run the %s"
    if reason in _WARNED:
        log.info(message, reason, instead)
    else:
        _WARNED.add(reason)
        log.warning(message, reason, instead)


def native_step_reason(sessions: OrtSessions) -> str | None:
    """None when ort-cpu runners take the native step (sejd/engines/native.py), else why not."""
    from sejd.engines import native

    if sessions.backend != "ort-cpu":
        return f"backend {sessions.backend}"
    if sessions.manifest.get("precision", "fp32") != "fp32":
        return f"engines built at {sessions.manifest.get('precision')} (the native step computes in fp32)"
    return _native_unsupported(sessions.bundle.config) or native.available()


def _native_unsupported(cfg) -> str | None:
    """Why the native step cannot run some block of this model (the first reason found), or None."""
    from sejd.engines import native

    return next((r for r in map(native.unsupported, block_specs(cfg)) if r), None)


class OrtBackend(EngineBackend):
    """`ort-cpu`, `ort-cuda`, `ort-trt`: ONNX Runtime with one execution provider (sejd/engines/ort.py)."""

    def __init__(self, name: str, polygraphy_flags: tuple):
        super().__init__(name)
        self.polygraphy_flags = polygraphy_flags

    def available(self):
        return unavailable_reason(self.name)

    def build(self, bundle, precision="fp32", threads=None, workspace=None, strip_weights=False):
        return build_ort(bundle, self.name, threads=threads, precision=precision)

    def _runners(self, bundle, precision, threads):
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
        return [str(engine_dir(bundle, self.name) / g["file"]), *self.polygraphy_flags]


BACKENDS = {b.name: register(b) for b in (
    OrtBackend("ort-cpu", ("--onnxrt",)), OrtBackend("ort-cuda", ("--onnxrt", "--providers", "cuda")),
    OrtBackend("ort-trt", ("--onnxrt", "--providers", "tensorrt", "cuda")))}
