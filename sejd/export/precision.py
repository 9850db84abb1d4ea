"""Reduced-precision ONNX graphs for an engine build, exported from the bundle's own model.

The bundle keeps its fp32 graphs. `sejd build --precision fp16|bf16` exports each block graph again
with the weights and matrix products in that type and LayerNorm, softmax and `exp` in float32 (see
`sejd.export.graphs`; blocks after the first two re-targeted and weights shared per block, as in
`sejd.export.exporter.GraphWriter`), so the precision is written into the graph itself: a strongly
typed TensorRT network or ONNX Runtime runs exactly those types. Inputs and outputs stay float32, so the contracts,
runners and checks are the same at every precision; `forward` stays fp32.
"""

from __future__ import annotations

import collections
from pathlib import Path

import onnx

from sejd.core.util import progress
from sejd.export.graphs import precision_dtype

KEPT_FP32 = ("LayerNormalization", "Softmax", "Exp")


def precision_graphs(bundle, precision: str, out_dir: Path, show_progress: bool = True) -> dict[str, Path]:
    """The ONNX file to build each of the bundle's graphs from (by its bundle-relative name)."""
    from sejd.export.exporter import GraphWriter
    from sejd.export.weights import WeightStore

    graphs = bundle.manifest["graphs"]
    if precision == "fp32":
        return {g["file"]: bundle.graph_path(g["variant"], g["block"]) for g in graphs}
    dtype = precision_dtype(precision)
    model = bundle.load_model()
    paths = {}
    with WeightStore(out_dir) as store:  # each block's graphs share one weight file here too
        writer = GraphWriter(model, bundle.unroll, bundle.manifest["opset"], store, dtype)
        for g in progress(graphs, desc=f"export {precision} graphs", enabled=show_progress):
            rel = g["file"]
            if g["block"] is None:  # forward: likelihood, not sampling; kept in fp32
                paths[rel] = bundle.path / rel
                continue
            paths[rel] = writer.write(g["block"], g["variant"], rel)
    return paths


def op_input_types(model: onnx.ModelProto) -> dict[str, collections.Counter]:
    """For each op type in the main graph: how many nodes take their first input in each element type."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    found: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for node in g.node:
        if node.input:
            found[node.op_type][onnx.TensorProto.DataType.Name(types.get(node.input[0], 0))] += 1
    return dict(found)
