"""The `torch-cuda` backend: the export graph modules run directly in PyTorch, with CUDA graphs.

The modules in `sejd.export.graphs` index the KV cache with position *tensors* and keep every shape
static, which is exactly what CUDA-graph capture needs: a single-token step (`StepKVGraph` plus an
in-place `index_copy_` into the static cache) and a full Jacobi pass (`JacobiGraph`) are captured
once per batch shape and replayed with new inputs copied into their static buffers. Windows
(GS-Jacobi, frozen prefix) run eagerly. On a CPU (tests) the same runner runs everything eagerly,
so its logic is checked against the PyTorch reference runner everywhere.

This is the baseline a GPU user would otherwise write by hand.
"""

from __future__ import annotations

import torch

from sejd.export.graphs import JacobiGraph, StepGraph, StepKVGraph
from sejd.model.tarflow import TarFlow
from sejd.runtime.runner import BlockRunner, Conditioning


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
            return self._replay("step", self._step, (x, torch.tensor(start, device=self.device)))
        xa, xb, *presents = self.window(x, torch.tensor(start, device=self.device), *self.caches, *self.cond)
        for cache, present in zip(self.caches, presents):  # in place: captured graphs keep their addresses
            cache.copy_(present)
        return xa, xb

    @torch.no_grad()
    def jacobi_iter(self, z, x, start=1, end=None):
        if start != 1 or (end or self.num_tokens) != self.num_tokens:
            return super().jacobi_iter(z, x, start, end)
        return self._replay("jacobi", self._jacobi, (z.to(self.device), x.to(self.device)))


def graph_runners(model: TarFlow, cuda_graphs: bool = True) -> list[GraphModuleRunner]:
    return [GraphModuleRunner(model, k, cuda_graphs) for k in range(model.config.num_blocks)]
