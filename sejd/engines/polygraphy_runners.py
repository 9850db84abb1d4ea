"""The Polygraphy runners `sejd check` compares each graph with: a runner over any Python callable (the
PyTorch reference, torch-cuda's graph modules) and Polygraphy's own runners over built engines.

Only `sejd check` uses them; Polygraphy is imported when a runner is made.
"""

from __future__ import annotations

import numpy as np

MODULE_VARIANTS = ("step_present", "step_rows", "window", "jacobi", "jacobi_k", "prefix")  # torch-cuda's graphs `sejd check` compares


def callable_runner(name: str, c, fn):
    """A Polygraphy runner over `fn(feed_dict) -> {output name: array}` for a graph contract `c`."""
    from polygraphy.backend.base import BaseRunner

    class _Runner(BaseRunner):
        def __init__(self):
            super().__init__(name=name)

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata
            meta = TensorMetadata()
            for s in c.inputs:
                meta.add(s.name, np.dtype(s.dtype), [d if isinstance(d, int) else -1 for d in s.shape])
            return meta

        def infer_impl(self, feed_dict):
            import time
            t0 = time.perf_counter()
            out = fn(feed_dict)
            self.inference_time = time.perf_counter() - t0  # Polygraphy reads it after every call
            return out

    return _Runner()


def module_runner(model, k: int, c, precision: str = "fp32"):
    """torch-cuda: a Polygraphy runner evaluating contract `c` with the graph module of block `k` on the
    model's device, at `precision`."""
    import torch

    from sejd.export.contracts import is_starflow
    from sejd.export.graphs import graph_module, precision_dtype

    if is_starflow(model.config):  # STARFlow's graph modules (sejd/export/starflow_graphs.py)
        from sejd.export.starflow_graphs import graph_module
    module = graph_module(model, k, c.variant, c.unroll, precision_dtype(precision))
    device = model.var.device

    @torch.no_grad()
    def run(feeds):
        out = module(*[torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in c.input_names])
        return {name: o.cpu().numpy() for name, o in zip(c.output_names, out)}

    return callable_runner(f"torch[{c.variant}, {precision}]", c, run)


def ort_engine_runner(bundle, backend: str):
    """Polygraphy's ONNX Runtime runner over each built engine, with the backend's providers and options."""
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from sejd.engines.manifest import engine_file
    from sejd.engines.ort import load_engine_manifest, providers, session_options

    manifest = load_engine_manifest(bundle, backend)

    def runner(g, c):
        path = str(engine_file(bundle, backend, g["file"], manifest))
        return OnnxrtRunner(lambda: ort.InferenceSession(path, session_options(level="none"),
                                                         providers=providers(bundle, backend, g)))
    return runner


def trt_engine_runner(bundle):
    """Polygraphy's own TensorRT runner over each built engine (profile 0 covers every batch size)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from sejd.engines.manifest import engine_file
    from sejd.engines.tensorrt import BACKEND, load_trt_manifest, plan_file

    manifest = load_trt_manifest(bundle)
    return lambda g, c: TrtRunner(EngineFromBytes(BytesFromPath(
        str(engine_file(bundle, BACKEND, plan_file(g["file"]), manifest)))))
