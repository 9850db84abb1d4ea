"""The native CPU step: one flow block's single-token step and its whole sequential inversion in C
(`native/step.c`), called through ctypes by the ort-cpu block runners.

Why: on a CPU a single-token step is ~1 MFLOP. An ONNX graph of it pays a dispatch per node
(~0.3 us, 40-150 nodes) and streams the block's weights from L3 on one thread; `step.c` splits every
weight matrix across the cores (each share stays in its core's L2) and runs a whole block's sequential
inversion as one call. Parallel (Jacobi) passes stay on ONNX Runtime, which is near the matrix-multiply
rate there.

The library is compiled when sejd is installed (setup.py), once per instruction-set level, and loaded
here at the best level this processor runs (`sejd/engines/native_lib.py`: the open file is checked, and
it must be built from this package's step.c): no compiler runs at run time and no code is ever loaded
from a bundle. `SEJD_NATIVE_ISA` picks a lower level; `SEJD_NATIVE_STEP=0` turns the native step off.
Without a usable library the runners keep the ONNX step graphs and say why, once.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading

import numpy as np
import torch

from sejd.core.errors import BackendUnavailable, InputError
from sejd.core.machine import usable_cores
from sejd.engines import native_lib
from sejd.engines.ort import OrtBlockRunner
from sejd.model.block import BlockSpec

MAX_HEAD_DIM = 512  # the attention's per-head accumulator in step.c is a stack array of this size
# The layer program step.c runs (`block_job`), as (op kind, adds into the residual stream): a block whose
# declared layer (sejd/model/block.py) is another program keeps the ONNX step. Its weighted ops take their
# weights in this order (`sejd_block_new`: weight and bias of each, LayerNorm scale and shift).
STEP_C_LAYER = (("layer_norm", False), ("linear", False), ("attention", False), ("linear", True),
                ("layer_norm", False), ("linear", False), ("gelu", False), ("linear", True))
SYMBOLS = ("sejd_pool_new", "sejd_pool_free", "sejd_pool_threads", "sejd_pool_park", "sejd_block_new",
           "sejd_block_free", "sejd_block_step", "sejd_block_sequential")

log = logging.getLogger("sejd.native")

_F32P = ctypes.POINTER(ctypes.c_float)


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ctypes.CDLL, str] | str:
    """(the library, its instruction-set level), or why it cannot be had (remembered)."""
    try:
        lib, level = native_lib.load(SYMBOLS)
    except native_lib.Unavailable as e:
        return f"native CPU step not available: {e}"
    return _declare(lib), level


def library() -> ctypes.CDLL:
    """The step library the install built, for this processor."""
    if os.environ.get("SEJD_NATIVE_STEP", "1") == "0":
        raise BackendUnavailable("native CPU step not available: SEJD_NATIVE_STEP=0")
    got = _load()
    if isinstance(got, str):
        raise BackendUnavailable(got)
    return got[0]


def level() -> str:
    """The instruction-set level of the loaded library (x86-64, x86-64-v3, x86-64-v4 or generic)."""
    library()
    return _load()[1]


def forget() -> None:
    """Load the library again at the next use (tests: another SEJD_NATIVE_ISA, another library)."""
    _load.cache_clear()
    native_lib.load.cache_clear()


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The C signatures of step.c's functions on a loaded library (returned, for chaining)."""
    P, I = ctypes.c_void_p, ctypes.c_int
    lib.sejd_build_id.restype, lib.sejd_build_id.argtypes = ctypes.c_char_p, []
    lib.sejd_pool_new.restype, lib.sejd_pool_new.argtypes = P, [I]
    lib.sejd_pool_free.restype, lib.sejd_pool_free.argtypes = None, [P]
    lib.sejd_pool_threads.restype, lib.sejd_pool_threads.argtypes = I, [P]
    lib.sejd_pool_park.restype, lib.sejd_pool_park.argtypes = None, [P]
    lib.sejd_block_new.restype = P
    lib.sejd_block_new.argtypes = [ctypes.POINTER(I), _F32P, _F32P, _F32P, ctypes.POINTER(_F32P), _F32P,
                                   _F32P, _F32P, ctypes.c_float]
    lib.sejd_block_free.restype, lib.sejd_block_free.argtypes = None, [P]
    # pool, block, B, R, pos, x, out, caches, labels, temps, guidance
    lib.sejd_block_step.restype = I
    lib.sejd_block_step.argtypes = [P, P, I, I, I, P, P, P, P, P, P]
    # pool, block, B, R, z, out, caches, labels, temps, guidance
    lib.sejd_block_sequential.restype = I
    lib.sejd_block_sequential.argtypes = [P, P, I, I, P, P, P, P, P, P]
    return lib


def _program(ops) -> str:
    return ", ".join(kind + (" + residual" if residual else "") for kind, residual in ops)


def starflow_options(spec: BlockSpec) -> str | None:
    """The STARFlow options of a block declaration (sejd/model/block.py) as words, or None for a TarFlow block:
    what the native step and ort-cpu's fused step graph do not compute."""
    found = [what for what, on in (
        ("rope positions", spec.positions == "rope"), ("a start token", spec.start_token),
        ("a final RMSNorm", spec.final_norm), ("a soft clip", bool(spec.soft_clip)),
        ("a softplus scale", spec.affine_scale == "softplus"), ("a text prefix", bool(spec.text_width)),
        ("STARFlow guidance", spec.guidance != "tarflow")) if on]
    return ", ".join(found) or None


def unsupported(spec: BlockSpec) -> str | None:
    """None when step.c can run blocks of this declaration, else why not."""
    starflow = starflow_options(spec)
    if starflow:
        return f"step.c runs TarFlow blocks; this block has STARFlow options ({starflow})"
    if spec.head_dim > MAX_HEAD_DIM:
        return f"head_dim {spec.head_dim} > {MAX_HEAD_DIM}"
    program = tuple((op.kind, op.residual) for op in spec.layer)
    if program != STEP_C_LAYER:
        return f"step.c runs layers of ({_program(STEP_C_LAYER)}), this block's layer is ({_program(program)})"
    C = spec.channels
    shapes = [op.shape for op in spec.layer if op.shape]
    E = shapes[4][0]  # the MLP width: the first MLP linear's outputs
    want = [(C,), (3 * C, C), (C, C), (C,), (E, C), (C, E)]
    if shapes != want:
        return f"step.c takes layer weights of shapes {want}, this block's are {shapes}"
    return None


def available() -> str | None:
    """None when the native step loads here, else why not."""
    try:
        library()  # the switch is looked at every time; the library once
    except BackendUnavailable as e:
        return str(e)
    return None


def default_threads() -> int:
    """The cores this process may use: the affinity mask and the cgroup CPU quota."""
    return usable_cores()


class Pool:
    """step.c's worker threads (`sejd_pool_new` of `lib`): `threads` of them, the calling thread included.
    Waiting threads spin briefly and then sleep; `park()` sends idle ones to sleep at once. In a forked
    child the pool has no workers and runs every call on the calling thread (`threads` then says 1)."""

    def __init__(self, threads: int, lib: ctypes.CDLL):
        handle = lib.sejd_pool_new(int(threads))
        if not handle:
            raise MemoryError("native CPU step: could not allocate its thread pool")
        self.lib, self.handle, self.requested, self.pid = lib, handle, int(threads), os.getpid()

    @property
    def threads(self) -> int:
        """Threads a call runs on in this process (1 in a forked child)."""
        return self.lib.sejd_pool_threads(self.handle)

    def park(self) -> None:
        """Idle workers stop spinning now (before other code, e.g. ONNX Runtime's thread pool, needs the
        cores); the next call wakes them."""
        self.lib.sejd_pool_park(self.handle)

    def __del__(self):
        if getattr(self, "handle", None):
            self.lib.sejd_pool_free(self.handle)  # joins the workers (after a call still running on it)
            self.handle = None


_pool: Pool | None = None  # the process-wide pool every native call runs on (set_threads replaces it)
_pool_lock = threading.Lock()


def pool(lib: ctypes.CDLL | None = None) -> Pool:
    """The process-wide pool, of `lib` (default: `library()`); one thread (the caller's) until
    `set_threads` says otherwise. A forked child keeps the parent's pool, which runs on the calling thread
    there, until it calls `set_threads`."""
    p = _pool
    if p is not None and (lib is None or p.lib is lib):
        return p
    return _set_pool(p.requested if p else 1, lib or library())  # first use, or a rebuilt library


def _set_pool(n: int, lib: ctypes.CDLL) -> Pool:
    """The pool, recreated unless it is `lib`'s, has `n` threads and was made in this process."""
    global _pool
    with _pool_lock:
        p = _pool
        if p is None or p.requested != n or p.lib is not lib or p.pid != os.getpid():
            _pool = p = Pool(n, lib)  # the old one is freed when its last call returns (a call holds it)
        return p


def threads() -> int:
    """Threads the native calls use now."""
    return _pool.threads if _pool is not None else 1


def set_threads(n: int | None) -> int:
    """Threads every native call uses from now on (None: the cores this process may use)."""
    return _set_pool(max(1, int(n or default_threads())), library()).threads


def park() -> None:
    """Idle native workers stop spinning now (see `Pool.park`); nothing when no pool exists yet."""
    if _pool is not None:
        _pool.park()


def _f32(t) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t, dtype=np.float32)


def _ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data


def _raise_for(rc: int) -> None:
    if rc == -1:
        raise MemoryError("native CPU step: could not allocate its scratch buffers")
    if rc:  # -2: step.c refused the sizes (checked here first, so a bug if it happens)
        raise InputError("native CPU step: batch and rows refused (rows must be batch or 2 x batch)")


class NativeBlock:
    """One MetaBlock's weights packed for step.c (the C side keeps its own copy): read by the names, and in the
    order, of the block's declared layer (sejd/model/block.py), zeros where it declares no bias."""

    def __init__(self, block, num_tokens: int):
        lib = library()
        spec = block.spec  # the declared block (sejd/model/block.py): what is packed, under which names
        reason = unsupported(spec)
        if reason:
            raise BackendUnavailable(f"native CPU step: {reason}")
        C, H, classes = spec.channels, spec.heads, spec.num_classes
        sd = block.state_dict()

        def weights(prefix: str, op) -> list[np.ndarray]:
            """An op's declared weight and bias (LayerNorm: scale and shift); zeros where it has no bias."""
            bias = sd[f"{prefix}{op.name}.bias"] if op.bias else torch.zeros(op.shape[0])
            return [_f32(sd[f"{prefix}{op.name}.weight"]), _f32(bias)]

        w_in, b_in = weights("", spec.proj_in)
        w_out, b_out = weights("", spec.proj_out)
        mlp_width = [op.shape[0] for op in spec.layer if op.kind == "linear"][2]  # STEP_C_LAYER's third linear
        dims = [spec.token_dim, C, H, num_tokens, spec.layers, mlp_width, spec.out_dim, int(spec.nvp), classes]
        with torch.no_grad():
            keep = {"pos": _f32(block.permute(sd["pos_embed"], dim=0) + torch.from_numpy(b_in)),  # (T, C)
                    "w_in": w_in, "w_out": w_out, "b_out": b_out}
            if classes:  # the class rows, then their mean for label -1 (unconditional)
                table = sd["class_embed"][:, 0]
                keep["classes"] = _f32(torch.cat([table, table.mean(0, keepdim=True)]))
        layers, eps = [], []
        for j in range(spec.layers):
            for op in spec.layer:  # in STEP_C_LAYER's order (checked by `unsupported`)
                if op.shape:
                    layers += weights(f"attn_blocks.{j}.", op)
                if op.kind == "layer_norm":
                    eps.append(op.eps)
        as_f = lambda a: None if a is None else a.ctypes.data_as(_F32P)  # noqa: E731
        params = (_F32P * len(layers))(*[as_f(p) for p in layers])
        handle = lib.sejd_block_new((ctypes.c_int * len(dims))(*dims), as_f(keep["w_in"]), as_f(keep["pos"]),
                                    as_f(keep.get("classes")), params, as_f(np.array(eps, np.float32)),
                                    as_f(keep["w_out"]), as_f(keep["b_out"]), float(spec.scale))
        if not handle:
            raise MemoryError("native CPU step: could not allocate the packed weights")
        self._lib, self.handle = lib, handle
        self.D, self.T, self.H, self.hd, self.L, self.classes = dims[0], num_tokens, H, spec.head_dim, dims[4], classes

    def __del__(self):
        if getattr(self, "handle", None):
            self._lib.sejd_block_free(self.handle)
            self.handle = None

    def cache_pointers(self, caches) -> ctypes.Array:
        """The caches' addresses as step.c takes them (a runner keeps this while its caches stay put)."""
        want = (2 * self.L, self.H, self.T, self.hd)
        if len(caches) != want[0]:
            raise InputError(f"native step: expected {want[0]} caches (key and value per layer), got {len(caches)}")
        rows = caches[0].shape[0] if caches[0].ndim else 0
        for c in caches:
            if c.dtype != np.float32 or not c.flags.c_contiguous or c.shape != (rows, *want[1:]):
                raise InputError(f"native step: caches must be contiguous float32 of shape (rows, {want[1]}, "
                                 f"{want[2]}, {want[3]}); got {c.dtype} {c.shape}")
        return (ctypes.c_void_p * len(caches))(*[c.ctypes.data for c in caches])

    def _check(self, what: str, batch: int, labels, temps, guidance) -> int:
        """The rows R (B or 2B with guidance) the conditioning describes, after checking it."""
        R = temps.shape[0] if temps.ndim == 1 else -1
        if batch < 1 or R not in (batch, 2 * batch) or temps.dtype != np.float32:
            raise InputError(f"native {what}: temps must be float32 of shape (B,) or (2B,) for a batch of "
                             f"{batch}; got {temps.dtype} {temps.shape}")
        if self.classes and (labels is None or labels.dtype != np.int64 or labels.shape != (R,)):
            raise InputError(f"native {what}: labels must be int64 of shape ({R},)")
        if guidance is not None and (guidance.dtype != np.float32 or guidance.shape != (2, self.T)
                                     or not guidance.flags.c_contiguous):
            raise InputError(f"native {what}: guidance must be contiguous float32 of shape (2, {self.T})")
        return R

    def step(self, x: np.ndarray, pos: int, caches, labels, temps, guidance):
        """x (B, D) token at `pos` -> guided (xa, xb) (B, D) for token pos+1; caches (R, H, T, hd), or
        their `cache_pointers`, get the token's keys/values at `pos`. Inputs are checked first."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.D or not 0 <= pos < self.T:
            raise InputError(f"native step: x must have shape (B, {self.D}) and pos be in [0, {self.T}); "
                             f"got {x.shape} at {pos}")
        R = self._check("step", x.shape[0], labels, temps, guidance)
        if not isinstance(caches, ctypes.Array):
            pointers = self.cache_pointers(caches)
            if caches[0].shape[0] != R:
                raise InputError(f"native step: caches have {caches[0].shape[0]} rows, the conditioning {R}")
            caches = pointers
        return self.step_unchecked(x, pos, caches, labels, temps, guidance)

    def step_unchecked(self, x: np.ndarray, pos: int, pointers: ctypes.Array, labels, temps, guidance):
        """`step` for a caller that checked the inputs already (a runner, against the step_rows contract):
        x contiguous float32 (B, D), pointers from `cache_pointers`."""
        out = np.empty((2, x.shape[0], self.D), np.float32)
        p = pool(self._lib)  # held through the call: set_threads on another thread frees the pool it replaces
        _raise_for(self._lib.sejd_block_step(p.handle, self.handle, x.shape[0], temps.shape[0], int(pos),
                                             x.ctypes.data, out.ctypes.data, pointers, _ptr(labels), _ptr(temps),
                                             _ptr(guidance)))
        return out[0], out[1]

    def sequential(self, z: np.ndarray, caches, labels, temps, guidance) -> np.ndarray:
        """The block's exact sequential inversion: z (B, T, D) -> x (B, T, D)."""
        z = np.ascontiguousarray(z, dtype=np.float32)
        if z.ndim != 3 or z.shape[1:] != (self.T, self.D):
            raise InputError(f"native sequential: z must have shape (B, {self.T}, {self.D}); got {z.shape}")
        R = self._check("sequential", z.shape[0], labels, temps, guidance)
        pointers = self.cache_pointers(caches)
        if caches[0].shape[0] != R:
            raise InputError(f"native sequential: caches have {caches[0].shape[0]} rows, the conditioning {R}")
        out = np.empty_like(z)
        p = pool(self._lib)  # held through the call (see step_unchecked)
        _raise_for(self._lib.sejd_block_sequential(p.handle, self.handle, z.shape[0], R, _ptr(z), _ptr(out),
                                                   pointers, _ptr(labels), _ptr(temps), _ptr(guidance)))
        return out


class NativeStepRunner(OrtBlockRunner):
    """ort-cpu for parallel passes (Jacobi, windows, loops); step.c for single tokens and for whole
    sequential blocks, reading and writing the same KV caches in place."""

    def __init__(self, sessions, block: int, model_block):
        super().__init__(sessions, block)
        self._model_block, self._native = model_block, None

    @property
    def single_token_path(self) -> str:
        return f"native CPU step ({level()}, {threads()} threads)"

    def _run(self, variant, feeds, cache_io=False):
        """Every ONNX Runtime pass of this runner (jacobi_iter, jacobi_chunk, jacobi_loop, a multi-token
        project's window, the ONNX graphs' fallbacks) starts with the native workers parked: none spins
        on a core that ONNX Runtime's own thread pool needs."""
        park()
        return super()._run(variant, feeds, cache_io)

    @property
    def native(self) -> NativeBlock:
        """The block packed for step.c, on first use: a plan that steps through one block packs only that
        one (at AFHQ-256 shape a block's packed weights are 232 MB)."""
        if self._native is None:
            self._native = NativeBlock(self._model_block, self.num_tokens)
        return self._native

    def begin(self, batch, cond):
        super().begin(batch, cond)
        f = self.cond_feeds
        self._native_cond = (f.get("labels"), f["temps"], f["guidance"] if self.rows == 2 * batch else None)
        self._pointers = {}  # per cache side: the caches' addresses, fixed until the next begin

    def project(self, x, start):
        if x.shape[1] != 1:
            return super().project(x, start)
        xa, xb = self.step(x[:, 0], start)
        return xa[:, None], xb[:, None]

    def step(self, x_tok, pos):
        x = np.ascontiguousarray(x_tok.numpy())
        # the inputs the step_rows graph would take, checked against its contract (once per shape)
        self._validate("step_rows", {"x": x[:, None], "pos": np.array(pos, np.int64)}, with_caches=True)
        if not 0 <= pos < self.num_tokens:
            raise InputError(f"step: position must be in [0, {self.num_tokens}), got {pos}")
        if self._current not in self._pointers:
            self._pointers[self._current] = self.native.cache_pointers(self._caches[self._current])
        xa, xb = self.native.step_unchecked(x, pos, self._pointers[self._current], *self._native_cond)
        return torch.from_numpy(xa), torch.from_numpy(xb)

    @property
    def one_call(self) -> frozenset:
        return super().one_call | {"sequential_loop"}  # the whole block's inversion in C

    def sequential_loop(self, z):
        self._validate("sequential_loop", {"z": z.numpy()}, with_caches=False)
        return torch.from_numpy(self.native.sequential(z.numpy(), self._caches[self._current], *self._native_cond))
