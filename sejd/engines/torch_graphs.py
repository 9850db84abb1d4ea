"""The `torch-cuda` backend: the export graph modules run directly in PyTorch, with CUDA graphs.

The modules in `sejd.export.graphs` index the KV cache with position *tensors* and keep every shape
static, which is exactly what CUDA-graph capture needs. Captured once per batch shape and replayed
with new inputs copied into their static buffers:
- `step`: one token (`StepKVGraph` plus an in-place `index_copy_` into the static cache);
- `jacobi`: one full parallel pass (`JacobiGraph`); `jacobi_chunk(k)`: k passes in one graph, so the
  host reads residuals once per chunk instead of once per iteration;
- `sequential_loop`: the whole exact inversion of a block (T-1 steps) as one graph: one launch
  instead of T-1 host round trips.
Positions come from a device-resident `arange`, so no step copies anything from the host.
Windows (GS-Jacobi, frozen prefix) run eagerly. On a CPU (tests) the same runner runs everything
eagerly, so its logic is checked against the PyTorch reference runner everywhere.

This is the baseline a GPU user would otherwise write by hand.
"""

from __future__ import annotations

import os

import torch

from sejd.export.graphs import JacobiGraph, StepGraph, StepKVGraph
from sejd.model.tarflow import TarFlow
from sejd.runtime.runner import BlockRunner, Conditioning, affine


class GraphModuleRunner(BlockRunner):
    def __init__(self, model: TarFlow, k: int, cuda_graphs: bool):
        cfg = model.config
        self.model = model
        block, T, classes = model.blocks[k], cfg.num_tokens, bool(cfg.num_classes)
        self.num_tokens, self.token_dim, self.cfg = T, cfg.token_dim, cfg
        self.device = block.pos_embed.device
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.step_kv = StepKVGraph(block, T, classes).eval()
        self.window = StepGraph(block, T, classes).eval()
        self.jacobi = JacobiGraph(block, T, classes).eval()
        self.has_classes = classes
        self.positions = torch.arange(T, device=self.device)  # positions[i]: a 0-d device view, no host copy
        self._state: dict = {}  # rows -> (caches, conditioning buffers, captured graphs)

    def begin(self, batch: int, cond: Conditioning) -> None:
        """Buffers (caches, conditioning) and captured graphs are kept per row count and refilled in
        place, so a graph captured once for a batch shape is replayed by every later batch of it."""
        dev, cfg = self.device, self.cfg
        self.batch = batch
        guidance = cond.guidance if cond.guidance is not None else torch.zeros(2, self.num_tokens)
        values = ([cond.labels] if self.has_classes else []) + [cond.temps.float(), guidance.float()]
        if cond.rows not in self._state:
            shape = (cond.rows, cfg.num_heads, self.num_tokens, cfg.head_dim)
            caches = [torch.zeros(shape, device=dev) for _ in range(2 * cfg.layers_per_block)]
            self._state[cond.rows] = (caches, [v.to(dev).clone() for v in values], {})
        self.caches, self.cond, self.graphs = self._state[cond.rows]
        for cache in self.caches:
            cache.zero_()
        for buf, v in zip(self.cond, values):
            buf.copy_(v)

    # eager bodies (also what gets captured)
    def _step(self, x_tok, pos):
        xa, xb, *news = self.step_kv(x_tok, pos, *self.caches, *self.cond)
        for cache, new in zip(self.caches, news):  # in place: static addresses for graph replay
            cache.index_copy_(2, pos.view(1), new)
        return xa, xb

    def _jacobi(self, z, x):
        return self.jacobi(z, x, *self.cond)

    def _jacobi_k(self, z, x, k):
        residuals = []
        for _ in range(k):
            x, res = self.jacobi(z, x, *self.cond)
            residuals.append(res)
        return x, torch.stack(residuals)

    def _sequential(self, z):
        """The exact inversion, T-1 unrolled steps (what `sequential` in decoders.py does, host-free)."""
        tokens = [z[:, 0]]
        for pos in range(self.num_tokens - 1):
            xa, xb = self._step(tokens[-1][:, None], self.positions[pos])
            tokens.append(affine(z[:, pos + 1], xa[:, 0], xb[:, 0]))
        return (torch.stack(tokens, dim=1),)

    def _replay(self, name, fn, inputs):
        """Run fn(*inputs), captured as a CUDA graph on first use for this batch shape."""
        if not self.cuda_graphs:
            return fn(*inputs)
        if name not in self.graphs:
            static = [t.clone() for t in inputs]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the capture (the writes are idempotent)
                fn(*static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = fn(*static)
            self.graphs[name] = (graph, static, outputs)
        graph, static, outputs = self.graphs[name]
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        return tuple(o.clone() for o in outputs)

    @torch.no_grad()
    def project(self, x, start):
        x = x.to(self.device)
        if x.shape[1] == 1:
            return self._replay("step", self._step, (x, self.positions[start]))
        xa, xb, *presents = self.window(x, self.positions[start], *self.caches, *self.cond)
        for cache, present in zip(self.caches, presents):  # in place: captured graphs keep their addresses
            cache.copy_(present)
        return xa, xb

    @torch.no_grad()
    def jacobi_iter(self, z, x, start=1, end=None):
        if start != 1 or (end or self.num_tokens) != self.num_tokens:
            return super().jacobi_iter(z, x, start, end)
        return self._replay("jacobi", self._jacobi, (z.to(self.device), x.to(self.device)))

    @torch.no_grad()
    def jacobi_chunk(self, z, x, k):
        fn = lambda z, x: self._jacobi_k(z, x, k)  # noqa: E731
        return self._replay(f"jacobi_chunk{k}", fn, (z.to(self.device), x.to(self.device)))

    @torch.no_grad()
    def sequential_loop(self, z):
        return self._replay("sequential_loop", self._sequential, (z.to(self.device),))[0]


def graph_runners(model: TarFlow, cuda_graphs: bool | None = None) -> list[GraphModuleRunner]:
    """One runner per block. CUDA graphs are on unless `cuda_graphs=False` or SEJD_CUDA_GRAPHS=0
    (eager CUDA: what the graphs save is measured against it)."""
    if cuda_graphs is None:
        cuda_graphs = os.environ.get("SEJD_CUDA_GRAPHS", "1") != "0"
    return [GraphModuleRunner(model, k, cuda_graphs) for k in range(model.config.num_blocks)]
