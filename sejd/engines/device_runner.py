"""The device block runner: callables with a graph contract (the export graph modules of torch-cuda,
TensorRT engines, ONNX Runtime's GPU providers) behind the BlockRunner interface, with static caches and
CUDA-graph capture.

Graphs are captured once per batch shape and replayed with new inputs copied into their static buffers:
a single-token step (`step_rows` plus an in-place `index_copy_` into the static cache), `jacobi` (one
full parallel pass) and `jacobi_chunk(k)` (k passes in one graph: residuals read once per chunk), and the
whole exact inversion of a block as one graph (`sequential_loop`). Positions come from a device-resident
`arange`, so no step copies anything from the host. Windows (GS-Jacobi, frozen prefix) run eagerly. On a
CPU (tests) everything runs eagerly, so the logic is checked against the PyTorch reference everywhere.
"""

from __future__ import annotations

import os

import torch

from sejd.export.graphs import (
    JacobiGraph,
    StepPresentGraph,
    StepRowsGraph,
    reduced_block,
)
from sejd.model.block import affine
from sejd.model.tarflow import TarFlow
from sejd.runtime.runner import BlockRunner, Conditioning, KVCachePool


class GraphModuleRunner(BlockRunner):
    """One block: `step_rows`, `window` and `jacobi` are callables with their graph contract's signature
    (device tensors in, device tensors out): the graph modules here, TensorRT engines in
    `sejd.engines.tensorrt`, which reuses everything else (caches, capture, fused operations)."""

    def __init__(self, model: TarFlow, k: int, cuda_graphs: bool, dtype: torch.dtype = torch.float32,
                 calls: dict | None = None, pool: KVCachePool | None = None):
        from sejd.export.contracts import block_dims

        cfg = model.config
        self.model = model
        self.pool = pool or KVCachePool()  # the factories pass one pool to all blocks of a model
        # the block's sizes (a STARFlow block's own: T + 1 runtime tokens, Lt + T + 1 cache slots, its depth)
        self.dims = d = block_dims(cfg, k)
        block, T, classes = model.blocks[k], d.num_tokens, bool(d.num_classes)
        self.num_tokens, self.token_dim, self.cfg = T, d.token_dim, cfg
        self.text_slots = d.text_length  # runtime position p is cache slot text_slots + p
        self.device = block.proj_in.weight.device
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.dtype = dtype  # of weights and matrix products; caches and tokens stay float32 (see graphs.py)
        if calls is None and d.starflow:
            from sejd.export import starflow_graphs as sg

            block = reduced_block(block, dtype)
            calls = {"step_rows": sg.StarStepRowsGraph(block, dtype).eval(),
                     "window": sg.StarWindowGraph(block, dtype).eval(), "jacobi": sg.StarJacobiGraph(block, 1, dtype).eval()}
            if d.text_length:
                calls["prefix"] = sg.StarPrefixGraph(block, dtype).eval()
        elif calls is None:
            block = reduced_block(block, dtype)  # one reduced copy shared by the three modules
            calls = {"step_rows": StepRowsGraph(block, T, classes, dtype=dtype).eval(),
                     "window": StepPresentGraph(block, T, classes, dtype=dtype).eval(),
                     "jacobi": JacobiGraph(block, T, classes, dtype=dtype).eval()}
        self.step_rows, self.window, self.jacobi = calls["step_rows"], calls["window"], calls["jacobi"]
        self.prefix_call = calls.get("prefix")  # a STARFlow text block's prefix pass
        self.prefix: list = []  # its keys/values per layer, inputs of the Jacobi calls
        self.jacobi_k = calls.get("jacobi_k")  # (unroll, callable): k Jacobi passes in one call, if any
        self.has_classes = classes
        self.positions = torch.arange(T, device=self.device)  # positions[i]: a 0-d device view, no host copy
        self._state: dict = {}  # rows -> (conditioning buffers, captured graphs, pool generation)

    def begin(self, batch: int, cond: Conditioning) -> None:
        """Conditioning buffers and captured graphs are kept per row count and refilled in place, so a
        graph captured once for a batch shape is replayed by every later batch of it. The caches are
        views of the model's pool: for a row count they sit at the same addresses every time (views at
        the start of the pool's flat buffers), which is what keeps captured graphs valid across blocks
        and batches; only when the pool grows (a larger batch) do the addresses change, and graphs
        captured before that (an older pool generation) are dropped and captured again."""
        dev, d = self.device, self.dims
        self.batch = batch
        # ml-starflow guides only the blocks with a text prefix; the others run the B conditional rows
        R = cond.rows if d.guided_rows else batch
        use = cond.guidance is not None and d.guided_rows
        guidance = cond.guidance if use else torch.zeros(2, self.num_tokens)
        values = ([cond.labels[:R]] if self.has_classes else []) + [cond.temps[:R].float(), guidance.float()]
        shape = (R, d.num_heads, d.cache_tokens, d.head_dim)
        self.caches = self.pool.caches(2 * d.layers_per_block, shape, torch.float32, dev)
        state = self._state.get(R)
        if state is None or state[2] != self.pool.generation:
            state = self._state[R] = ([v.to(dev).clone() for v in values], {}, self.pool.generation)
        self.cond, self.graphs, _ = state
        for cache in self.caches:  # another block's keys/values may be there; the step graphs read all T
            cache.zero_()
        for buf, v in zip(self.cond, values):
            buf.copy_(v)
        if self.prefix_call is not None:
            self._begin_prefix(cond.text, R)

    @torch.no_grad()
    def _begin_prefix(self, text, R: int) -> None:
        """A STARFlow text block: the prefix pass on the rows' text fills cache slots [0, Lt); its keys/values
        are kept in buffers per row count (static addresses for captured Jacobi graphs)."""
        from sejd.core.errors import InputError

        d = self.dims
        want = (R, d.text_length, d.text_width)
        if not torch.is_tensor(text) or text.dim() != 3 or tuple(text.shape[1:]) != want[1:] or text.shape[0] < R:
            got = tuple(text.shape) if torch.is_tensor(text) else None if text is None else type(text).__name__
            raise InputError(f"this block is text-conditioned: the conditioning must hold text embeddings of shape "
                             f"{want} (rows: cond then uncond; text_length x text_width), got {got}")
        kv = self.prefix_call(text[:R].to(self.device, torch.float32))
        buffers = self.graphs.setdefault("prefix buffers", [t.clone() for t in kv])
        for buf, t, cache in zip(buffers, kv, self.caches):
            buf.copy_(t)
            cache[:, :, :d.text_length] = t
        self.prefix = buffers

    # eager bodies (also what gets captured)
    def _step(self, x_tok, pos):
        xa, xb, *news = self.step_rows(x_tok, pos, *self.caches, *self.cond)
        slot = (pos + self.text_slots).view(1) if self.text_slots else pos.view(1)
        for cache, new in zip(self.caches, news):  # in place: static addresses for graph replay
            cache.index_copy_(2, slot, new)
        return xa, xb

    def _jacobi(self, z, x):
        return self.jacobi(z, x, *self.prefix, *self.cond)

    def _jacobi_k(self, z, x, k):
        if self.jacobi_k is not None and self.jacobi_k[0] == k:
            x, _, residuals = self.jacobi_k[1](z, x, *self.prefix, *self.cond)
            return x, residuals
        residuals = []
        for _ in range(k):
            x, res = self.jacobi(z, x, *self.prefix, *self.cond)
            residuals.append(res)
        return x, torch.stack(residuals)

    def _sequential(self, z):
        """The exact inversion, T-1 unrolled steps (what `sequential` in decoders.py does, host-free)."""
        tokens = [z[:, 0]]
        for pos in range(self.num_tokens - 1):
            xa, xb = self._step(tokens[-1][:, None], self.positions[pos])
            tokens.append(affine(z[:, pos + 1], xa[:, 0], xb[:, 0]))
        return (torch.stack(tokens, dim=1),)

    def _engine_epoch(self) -> tuple:
        """Changes whenever an engine call used inside captured graphs reconfigures its execution context
        for other shapes (TensorRT: a graph is valid only with the context state it was captured with)."""
        return tuple(getattr(c, "epoch", 0) for c in (self.step_rows, self.jacobi, (self.jacobi_k or (0, None))[1]))

    def _replay(self, name, fn, inputs):
        """Run fn(*inputs), captured as a CUDA graph on first use for these input shapes."""
        if not self.cuda_graphs:
            return fn(*inputs)
        key = (name, tuple((tuple(t.shape), t.dtype) for t in inputs))
        epoch = self._engine_epoch()
        if key not in self.graphs or self.graphs[key][3] != epoch:
            static = [t.clone() for t in inputs]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the capture (the writes are idempotent)
                fn(*static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = fn(*static)
            self.graphs[key] = (graph, static, outputs, self._engine_epoch())
        graph, static, outputs, _ = self.graphs[key]
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        return tuple(o.clone() for o in outputs)

    @torch.no_grad()
    def project(self, x, start):
        x = x.to(self.device)
        if x.shape[1] == 1:
            return self._replay("step_rows", self._step, (x, self.positions[start]))
        xa, xb, *presents = self.window(x, self.positions[start], *self.caches, *self.cond)
        for cache, present in zip(self.caches, presents):  # in place: captured graphs keep their addresses
            cache.copy_(present)
        return xa, xb

    @torch.no_grad()
    def jacobi_iter(self, z, x, start=1, end=None):
        if start != 1 or (end or self.num_tokens) != self.num_tokens:
            return super().jacobi_iter(z, x, start, end)
        return self._replay("jacobi", self._jacobi, (z.to(self.device), x.to(self.device)))

    @property
    def one_call(self) -> frozenset:
        # captured on CUDA: K passes, or the whole block's inversion, replayed as one graph
        captured = {"jacobi_chunk", "sequential_loop"} if self.cuda_graphs else set()
        return frozenset(captured | ({"jacobi_chunk"} if self.jacobi_k is not None else set()))

    @torch.no_grad()
    def jacobi_chunk(self, z, x, k):
        fn = lambda z, x: self._jacobi_k(z, x, k)  # noqa: E731
        return self._replay(f"jacobi_chunk{k}", fn, (z.to(self.device), x.to(self.device)))

    @torch.no_grad()
    def sequential_loop(self, z):
        return self._replay("sequential_loop", self._sequential, (z.to(self.device),))[0]


class EngineBlockRunner(GraphModuleRunner):
    """The device runner over engine callables: `call(variant)` gives a callable with the variant's
    graph contract (device tensors in and out). Used by TensorRT and ONNX Runtime's GPU providers."""

    def __init__(self, call, exported, unroll: int, model: TarFlow, k: int, cuda_graphs: bool,
                 pool: KVCachePool | None = None):
        from sejd.export.bundle import BundleError

        missing = {"step_rows", "window", "jacobi"} - set(exported)
        if missing:
            raise BundleError(f"GPU engine runners need the {sorted(missing)} graphs; re-export the bundle")
        calls = {v: call(v) for v in ("step_rows", "window", "jacobi")}
        if "jacobi_k" in exported:
            calls["jacobi_k"] = (unroll, call("jacobi_k"))
        if model.blocks[k].spec.text_width:  # a STARFlow text block's prefix pass
            if "prefix" not in exported:
                raise BundleError("a STARFlow text block needs the 'prefix' graph; re-export the bundle")
            calls["prefix"] = call("prefix")
        super().__init__(model, k, cuda_graphs, calls=calls, pool=pool)
        self.call, self.exported = call, set(exported)

    @property
    def one_call(self) -> frozenset:
        return super().one_call | {op for op in ("jacobi_loop", "sequential_loop") if op in self.exported}

    @torch.no_grad()
    def jacobi_loop(self, z, x, tau, cap):
        if "jacobi_loop" not in self.exported:
            return super().jacobi_loop(z, x, tau, cap)
        dev = self.device
        x, residual, iterations = self.call("jacobi_loop")(
            z.to(dev), x.to(dev), torch.tensor(float(tau), device=dev), torch.tensor(int(cap), device=dev), *self.cond)
        return x, residual, int(iterations)

    @torch.no_grad()
    def sequential_loop(self, z):
        if "sequential_loop" not in self.exported:
            return super().sequential_loop(z)
        return self.call("sequential_loop")(z.to(self.device), *self.cond)[0]


def cuda_graphs_default() -> bool:
    return os.environ.get("SEJD_CUDA_GRAPHS", "1") != "0"
