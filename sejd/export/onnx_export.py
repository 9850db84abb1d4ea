"""torch -> ONNX for every variant, following the contracts.

The TorchScript-based exporter (`dynamo=False`) is used: it turns the symbolic batch/rows arithmetic
of the CFG row selection into shape ops, and gives stable input/output names, which the hand-built
ONNX `Loop` graphs in `loops.py` rely on.

With a `scratch` folder, torch writes the graph there: a graph over protobuf's 2 GB then gets its
tensors in torch's own external files, and the returned ModelProto (loaded with
`load_external_data=False`) references them relative to `scratch`, so it is never held whole in
memory. `sejd.export.weights` moves them into the bundle's shared weight files.

A module whose parameters are lean placeholders (`sejd.export.lean`) is traced without constant folding, and
`sources` (when given) receives its initializers' real tensors by name.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import onnx
import torch

from sejd.export import graphs, loops
from sejd.export.contracts import GraphContract, contract, dummy_inputs, is_starflow
from sejd.export.lean import lean_sources
from sejd.model.tarflow import TarFlow

FORWARD_BODY = "forward_body"  # one block's forward pass, composed into `forward` (see loops.forward_chain)


def _to_onnx(module: torch.nn.Module, args: tuple, input_names, output_names, dynamic_axes, opset: int,
             scratch: Path | None = None, sources: dict | None = None) -> onnx.ModelProto:
    target = io.BytesIO() if scratch is None else str(Path(scratch) / "graph.onnx")  # a path: >2 GB allowed
    lean = lean_sources(module)
    if sources is not None:
        sources.update(lean)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic are expected here
        torch.onnx.export(module.eval(), args, target, dynamo=False, input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=opset,
                          do_constant_folding=not lean)  # folding would copy (and transpose) placeholders
    if scratch is None:
        return onnx.load_from_string(target.getvalue())
    model = onnx.load(target, load_external_data=False)
    Path(target).unlink()  # the tensors torch wrote beside it (if any) stay, referenced by `model`
    return model


def _args(c: GraphContract, feeds: dict) -> tuple:
    return tuple(torch.from_numpy(feeds[n]) for n in c.input_names)


def export_block_variant(model: TarFlow, k: int, variant: str, unroll: int, opset: int,
                         dtype: torch.dtype = torch.float32, scratch: Path | None = None,
                         sources: dict | None = None) -> onnx.ModelProto:
    """One block's graph. `dtype` < float32: weights and matrix products in that type, LayerNorm,
    softmax and exp in float32, inputs and outputs float32 (see graphs.py). `scratch`, `sources`: see above
    (lean tracing is used for STARFlow blocks)."""
    if variant == FORWARD_BODY:  # always float32, like the forward graph it is composed into
        return export_forward_body(model, k, opset, scratch)
    cfg = model.config
    if is_starflow(cfg):
        from sejd.export import starflow_graphs

        c = contract(cfg, variant, unroll, block=k)
        m = starflow_graphs.graph_module(model, k, variant, unroll, dtype)
        feeds = dummy_inputs(c, cfg, batch=2)
        return _to_onnx(m, _args(c, feeds), c.input_names, c.output_names, c.dynamic_axes(), opset, scratch, sources)
    block, T, has_classes = model.blocks[k], cfg.num_tokens, bool(cfg.num_classes)
    c = contract(cfg, variant, unroll)
    feeds = dummy_inputs(c, cfg, batch=2)
    if variant in ("step_present", "window", "step_rows", "jacobi", "jacobi_k"):
        m = graphs.graph_module(model, k, variant, unroll, dtype)
        return _to_onnx(m, _args(c, feeds), c.input_names, c.output_names, c.dynamic_axes(), opset, scratch)
    if variant == "jacobi_loop":
        body_c = contract(cfg, "jacobi")
        body = _to_onnx(graphs.JacobiGraph(block, T, has_classes, dtype=dtype), _args(body_c, dummy_inputs(body_c, cfg)),
                        body_c.input_names, body_c.output_names, body_c.dynamic_axes(), opset, scratch)
        return loops.jacobi_loop(body, c, T, opset)
    if variant == "sequential_loop":
        step_c = contract(cfg, "step_present")
        sf = dummy_inputs(step_c, cfg)
        cache_names = [s.name for s in step_c.inputs if s.name.startswith("past.")]
        cond_names = [s.name for s in step_c.inputs if s.name in ("labels", "temps", "guidance")]
        names = ["i", "z", "x", *cache_names, *cond_names]
        tok = torch.randn(2, T, cfg.token_dim)
        args = (torch.tensor(3), tok, tok.clone(), *[torch.from_numpy(sf[n]) for n in cache_names + cond_names])
        outs = ["x_next", *[n.replace("past.", "present.") for n in cache_names]]
        axes = {"z": {0: "batch"}, "x": {0: "batch"}, "x_next": {0: "batch"},
                **{n: {0: "rows"} for n in cache_names + outs[1:]},
                **({"labels": {0: "rows"}} if has_classes else {}), "temps": {0: "rows"}}
        body = _to_onnx(graphs.SequentialBody(block, T, has_classes, dtype=dtype), args, names, outs, axes, opset,
                        scratch)
        return loops.sequential_loop(body, c, cfg, cache_names, opset)
    raise ValueError(variant)


def export_forward_body(model: TarFlow, k: int, opset: int, scratch: Path | None = None) -> onnx.ModelProto:
    """Block k's forward pass in its own token order: x (batch, T, D) [, labels (batch,)] -> z, logdet."""
    cfg = model.config
    c = contract(cfg, "forward")
    has_classes = bool(cfg.num_classes)
    feeds = dummy_inputs(c, cfg, batch=2)
    names = ["x", "labels"] if has_classes else ["x"]
    args = (torch.randn(2, cfg.num_tokens, cfg.token_dim), *([torch.from_numpy(feeds["labels"])] if has_classes else []))
    return _to_onnx(graphs.BlockForwardGraph(model.blocks[k], cfg.num_tokens), args, names,
                    ["z", "logdet"], {n: {0: "batch"} for n in (*names, "z", "logdet")}, opset, scratch)
