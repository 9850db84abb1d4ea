"""Graphs assembled around exported bodies: the ONNX `Loop`s `jacobi_loop` and `sequential_loop`, and
the whole-model `forward` chain of per-block forward bodies.

The bodies come from torch (one Jacobi iteration; one KV-cached sequential step). Values that do
not change across iterations (z, labels, temps, guidance, tau) are read from the outer scope; every
body-local name gets a prefix so nothing shadows an outer name. Loop-carried shapes are constant
across iterations (TensorRT requires it) and no sequence ops are used.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from sejd.export.contracts import GraphContract

OUTER = ("z", "labels", "temps", "guidance", "tau")


def _rename_body(graph: onnx.GraphProto, prefix: str, keep=OUTER) -> None:
    """Prefix every value name of `graph` except outer-scope references in `keep` (in place)."""
    def new(name):
        return name if (not name or name in keep) else prefix + name

    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        v.name = new(v.name)
    for t in graph.initializer:
        t.name = new(t.name)
    for node in graph.node:
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]
        node.name = new(node.name) if node.name else node.name


def _hoist_initializers(body: onnx.GraphProto) -> list:
    """Move the body's weights to the outer graph (read from the outer scope): every tool then finds them
    where it looks for a graph's weights, external data and ONNX Runtime's optimised-model saving included."""
    weights = list(body.initializer)
    del body.initializer[:]
    return weights


def _take_inputs(graph: onnx.GraphProto, names: list[str]) -> dict:
    """Remove inputs `names` from the graph's input list (they become outer-scope references)."""
    kept, taken = [], {}
    for v in graph.input:
        (taken.__setitem__(v.name, v) if v.name in names else kept.append(v))
    del graph.input[:]
    graph.input.extend(kept)
    return taken


def _scalar(name, dtype):
    return helper.make_tensor_value_info(name, dtype, [])


def _const(name, dtype, values, dims=()):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name + "_v", dtype, list(dims), values))


def _finish(graph: onnx.GraphProto, body: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="sejd")
    model.ir_version = body.ir_version
    return model


def _outer_inputs(body_graph, c: GraphContract, taken: dict):
    """Outer graph inputs in contract order, typed from the body where the body had them."""
    ins = []
    for s in c.inputs:
        if s.name in taken:
            ins.append(taken[s.name])
        else:
            dt = TensorProto.FLOAT if s.dtype == "float32" else TensorProto.INT64
            ins.append(helper.make_tensor_value_info(s.name, dt, [d for d in s.shape]))
    return ins


def jacobi_loop(body: onnx.ModelProto, c: GraphContract, num_tokens: int, opset: int) -> onnx.ModelProto:
    g = onnx.GraphProto()
    g.CopyFrom(body.graph)
    taken = _take_inputs(g, [n for n in OUTER if n != "tau"])
    _rename_body(g, "jb/")
    weights = _hoist_initializers(g)  # before the Loop node copies the body
    # body inputs: (iteration, cond, x, residual, count); body's own x input is carried
    (x_in,) = [v for v in g.input if v.name == "jb/x"]
    x_next, res_next = g.output[0].name, g.output[1].name
    del g.output[:]
    g.node.extend([
        _const("jb/one", TensorProto.INT64, [1]),
        helper.make_node("Add", ["jb/count_in", "jb/one"], ["jb/count_out"]),
        helper.make_node("ReduceMax", [res_next], ["jb/res_max"], keepdims=0),
        # continue while max residual >= tau: stops on convergence, and on NaN (the host reports it)
        helper.make_node("GreaterOrEqual", ["jb/res_max", "tau"], ["jb/cond_out"]),
    ])
    inputs = [_scalar("jb/iter", TensorProto.INT64), _scalar("jb/cond_in", TensorProto.BOOL), x_in,
              helper.make_tensor_value_info("jb/res_in", TensorProto.FLOAT, ["batch"]),
              _scalar("jb/count_in", TensorProto.INT64)]
    del g.input[:]
    g.input.extend(inputs)
    g.output.extend([_scalar("jb/cond_out", TensorProto.BOOL),
                     helper.make_tensor_value_info(x_next, TensorProto.FLOAT, ["batch", num_tokens, x_in.type.tensor_type.shape.dim[2].dim_value]),
                     helper.make_tensor_value_info(res_next, TensorProto.FLOAT, ["batch"]),
                     _scalar("jb/count_out", TensorProto.INT64)])
    g.name = "jacobi_body"
    nodes = [
        _const("T_minus_1", TensorProto.INT64, [num_tokens - 1]),
        helper.make_node("Min", ["max_iters", "T_minus_1"], ["trip_count"]),
        _const("cond0", TensorProto.BOOL, [True]),
        _const("count0", TensorProto.INT64, [0]),
        helper.make_node("Shape", ["x0"], ["x0_shape"], start=0, end=1),
        helper.make_node("ConstantOfShape", ["x0_shape"], ["res0"],
                         value=helper.make_tensor("inf", TensorProto.FLOAT, [1], [float("inf")])),
        helper.make_node("Loop", ["trip_count", "cond0", "x0", "res0", "count0"], ["x", "residual", "iterations"],
                         body=g),
    ]
    outer = helper.make_graph(nodes, "jacobi_loop", _outer_inputs(g, c, {**taken}),
                              [helper.make_tensor_value_info(s.name, TensorProto.FLOAT if s.dtype == "float32"
                                                             else TensorProto.INT64, list(s.shape)) for s in c.outputs],
                              initializer=weights)
    return _finish(outer, body, opset)


def sequential_loop(body: onnx.ModelProto, c: GraphContract, cfg, cache_names: list[str], opset: int) -> onnx.ModelProto:
    g = onnx.GraphProto()
    g.CopyFrom(body.graph)
    taken = _take_inputs(g, [n for n in OUTER if n != "tau"])
    _rename_body(g, "sb/")
    weights = _hoist_initializers(g)  # before the Loop node copies the body
    g.node.append(helper.make_node("Identity", ["sb/cond_in"], ["sb/cond_out"]))
    carried = [v for v in g.input if v.name != "sb/i"]
    iter_in = [v for v in g.input if v.name == "sb/i"][0]
    iter_in.type.tensor_type.ClearField("shape")
    iter_in.type.tensor_type.shape.SetInParent()  # scalar
    del g.input[:]
    g.input.extend([iter_in, _scalar("sb/cond_in", TensorProto.BOOL), *carried])
    outs = list(g.output)
    del g.output[:]
    g.output.extend([_scalar("sb/cond_out", TensorProto.BOOL), *outs])
    g.name = "sequential_body"
    zeros_shape = [cfg.num_heads, cfg.num_tokens, cfg.head_dim]
    nodes = [
        _const("trip_count", TensorProto.INT64, [cfg.num_tokens - 1]),
        _const("cond0", TensorProto.BOOL, [True]),
        helper.make_node("Shape", ["temps"], ["rows"], start=0, end=1),
        _const("cache_tail", TensorProto.INT64, zeros_shape, dims=[3]),
        helper.make_node("Concat", ["rows", "cache_tail"], ["cache_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["cache_shape"], ["cache0"],
                         value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("Loop", ["trip_count", "cond0", "z", *["cache0"] * len(cache_names)],
                         ["x", *[f"final.{n}" for n in cache_names]], body=g),
    ]
    outer = helper.make_graph(nodes, "sequential_loop", _outer_inputs(g, c, taken),
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(c.outputs[0].shape))],
                              initializer=weights)
    return _finish(outer, body, opset)


INT64_MIN = -(2**63)


def _flip_tokens(src: str, dst: str) -> onnx.NodeProto:
    """x[:, ::-1] (a block's token permutation is its own inverse); the constants are made once in
    `forward_chain`."""
    return helper.make_node("Slice", [src, "flip.starts", "flip.ends", "flip.axes", "flip.steps"], [dst])


def forward_chain(bodies, c: GraphContract, cfg, opset: int) -> onnx.ModelProto:
    """The whole model's `forward` graph from per-block forward bodies, without tracing the model at once.

    `bodies`: (body, flip) per block in order, body the exported `BlockForwardGraph` (x [, labels] ->
    z, logdet in the block's own token order, its tensors already in external files: only topology is
    held here), flip whether the block reverses the token order. Consumed one at a time. The chain is
    what TarFlow.forward computes: patchify (as F.unfold: channel-major inside a token, tokens in raster
    order), then each block between its permutation and back, logdets summed in block order."""
    s, p = cfg.img_size // cfg.patch_size, cfg.patch_size
    nodes = [
        _const("patch.shape", TensorProto.INT64, [-1, cfg.in_channels, s, p, s, p], dims=[6]),
        helper.make_node("Reshape", ["image", "patch.shape"], ["patch.grid"]),  # (B, C, s, p, s, p)
        helper.make_node("Transpose", ["patch.grid"], ["patch.tokens"], perm=[0, 2, 4, 1, 3, 5]),  # (B, s, s, C, p, p)
        _const("token.shape", TensorProto.INT64, [-1, cfg.num_tokens, cfg.token_dim], dims=[3]),
        helper.make_node("Reshape", ["patch.tokens", "token.shape"], ["x.0"]),
        *[_const(f"flip.{n}", TensorProto.INT64, [v], dims=[1])
          for n, v in (("starts", -1), ("ends", INT64_MIN), ("axes", 1), ("steps", -1))],
    ]
    x, logdet, weights, taken, first = "x.0", None, [], {}, None
    for k, (body, flip) in enumerate(bodies):
        g = onnx.GraphProto()
        g.CopyFrom(body.graph)
        labels = _take_inputs(g, ["labels"])  # every body reads the outer graph's labels
        taken = taken or labels
        _rename_body(g, f"b{k}/", keep=("labels",))
        weights += _hoist_initializers(g)
        (x_in,) = [v.name for v in g.input]
        nodes.append(_flip_tokens(x, x_in) if flip else helper.make_node("Identity", [x], [x_in]))
        nodes.extend(g.node)
        z, ld = (o.name for o in g.output)
        if flip:
            nodes.append(_flip_tokens(z, f"b{k}/z.image_order"))
            z = f"b{k}/z.image_order"
        if logdet is not None:
            nodes.append(helper.make_node("Add", [logdet, ld], [f"logdet.{k}"]))
            ld = f"logdet.{k}"
        x, logdet, first = z, ld, first or body
    nodes += [helper.make_node("Identity", [x], ["z"]), helper.make_node("Identity", [logdet], ["logdet"])]
    outer = helper.make_graph(nodes, "forward", _outer_inputs(None, c, taken),
                              [helper.make_tensor_value_info(s.name, TensorProto.FLOAT, list(s.shape))
                               for s in c.outputs], initializer=weights)
    return _finish(outer, first, opset)
