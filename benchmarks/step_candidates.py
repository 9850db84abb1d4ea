"""The candidates for the CPU single-token step, side by side in one process (issue: a CPU step near the
arithmetic floor). One block of the model, one token at the middle of the sequence, median of --runs calls:

- `pytorch`: the exported step module (`StepRowsGraph`) in PyTorch eager, one thread;
- `onnx step_rows`: the bundle's exported graph as ONNX Runtime runs it (optimised at level "all");
- `onnx contrib`: a hand-built graph of ONNX Runtime's fused CPU operators (Gemm with the bias,
  SkipLayerNormalization, Gelu, GroupQueryAttention writing this token's key/value into a cache bound as
  both past and present, so nothing is copied), guidance-free: the fewest nodes ONNX Runtime can run;
- `native`: sejd's C step (`sejd/engines/native/step.c`), what ort-cpu runners use, on 1 and all cores.

Each candidate's outputs are compared with the PyTorch module first (max abs error printed). JSON on stdout.

    python benchmarks/step_candidates.py builtin:textures --batch 1,16
    python benchmarks/step_candidates.py --shape afhq256 --batch 1   # one random block of a published shape
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np
import torch

from sejd import load_checkpoint
from sejd.export.graphs import StepRowsGraph


def contrib_step_graph(block, T: int):
    """One block's single-token step from ONNX Runtime's contrib operators; rows = batch (no guidance),
    attention temperature 1. Inputs x (R, D), seqlens (R,) int32 = pos, total () int32 = pos + 1, the
    caches past.L.key/value (R, H, T, hd) bound in place as present.L.*; outputs p (R, P) = proj_out."""
    from onnx import TensorProto, helper, numpy_helper

    attn = block.attn_blocks[0].attention
    H, C, D = attn.num_heads, block.pos_embed.shape[1], block.proj_in.in_features
    inits, nodes = [], []

    def weight(name, t):
        a = t.detach().numpy() if hasattr(t, "detach") else np.asarray(t)
        inits.append(numpy_helper.from_array(np.ascontiguousarray(a.astype(np.float32) if a.dtype.kind == "f" else a), name))
        return name

    def node(op, ins, outs, domain="", **kw):
        nodes.append(helper.make_node(op, ins, outs, domain=domain, **kw))
        return outs[0] if len(outs) == 1 else outs

    pos_table = block.permute(block.pos_embed.detach(), dim=0) + block.proj_in.bias.detach()
    bias = node("Gather", [weight("pos_table", pos_table), "pos"], ["bias_at_pos"], axis=0)
    h = node("Gemm", ["x", weight("w_in", block.proj_in.weight), bias], ["h0"], transB=1)
    weight("qkv_shape", np.array([0, 1, -1], np.int64))
    weight("row_shape", np.array([-1, C], np.int64))
    out, residual = None, h
    for i, layer in enumerate(block.attn_blocks):
        a, m = layer.attention, layer.mlp
        g1, b1 = weight(f"ln1_g{i}", a.norm.weight), weight(f"ln1_b{i}", a.norm.bias)
        if out is None:
            normed = node("LayerNormalization", [h, g1, b1], [f"n1_{i}"], axis=-1, epsilon=a.norm.eps)
        else:  # the residual add fused into the next LayerNorm
            normed, _, _, residual = node("SkipLayerNormalization", [out, residual, g1, b1],
                                          [f"n1_{i}", f"_m{i}", f"_v{i}", f"h1_{i}"], domain="com.microsoft",
                                          epsilon=a.norm.eps)
        qkv = node("Gemm", [normed, weight(f"w_qkv{i}", a.qkv.weight), weight(f"b_qkv{i}", a.qkv.bias)], [f"qkv{i}"],
                   transB=1)
        qkv3 = node("Reshape", [qkv, "qkv_shape"], [f"qkv3_{i}"])
        att = node("GroupQueryAttention", [qkv3, "", "", f"past.{i}.key", f"past.{i}.value", "seqlens", "total"],
                   [f"att{i}", f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft", num_heads=H,
                   kv_num_heads=H, scale=float(a.scale))[0]
        att2 = node("Reshape", [att, "row_shape"], [f"att2_{i}"])
        proj = node("Gemm", [att2, weight(f"w_o{i}", a.proj.weight), weight(f"b_o{i}", a.proj.bias)], [f"o{i}"],
                    transB=1)
        normed2, _, _, residual = node("SkipLayerNormalization", [proj, residual, weight(f"ln2_g{i}", m.norm.weight),
                                                                  weight(f"ln2_b{i}", m.norm.bias)],
                                       [f"n2_{i}", f"_m2{i}", f"_v2{i}", f"h2_{i}"], domain="com.microsoft",
                                       epsilon=m.norm.eps)
        f1 = node("Gemm", [normed2, weight(f"w1_{i}", m.main[0].weight), weight(f"b1_{i}", m.main[0].bias)], [f"f1_{i}"],
                  transB=1)
        g = node("Gelu", [f1], [f"g{i}"], domain="com.microsoft")
        out = node("Gemm", [g, weight(f"w2_{i}", m.main[2].weight), weight(f"b2_{i}", m.main[2].bias)], [f"f2_{i}"],
                   transB=1)
    last = node("Add", [out, residual], ["h_last"])
    node("Gemm", [last, weight("w_out", block.proj_out.weight), weight("b_out", block.proj_out.bias)], ["p"], transB=1)
    L, hd, F = len(block.attn_blocks), C // H, TensorProto.FLOAT
    cache = ["R", H, T, hd]
    inputs = [helper.make_tensor_value_info("x", F, ["R", D]), helper.make_tensor_value_info("pos", TensorProto.INT64, []),
              helper.make_tensor_value_info("seqlens", TensorProto.INT32, ["R"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    inputs += [helper.make_tensor_value_info(f"past.{i}.{kv}", F, cache) for i in range(L) for kv in ("key", "value")]
    outputs = [helper.make_tensor_value_info("p", F, ["R", block.proj_out.out_features])]
    outputs += [helper.make_tensor_value_info(f"present.{i}.{kv}", F, cache) for i in range(L) for kv in ("key", "value")]
    graph = helper.make_graph(nodes, "contrib_step", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def timed(fn, runs: int, warmup: int) -> float:
    from variant_latency import call_times  # a sibling script (benchmarks/ is on the path when run)

    return statistics.median(call_times(fn, runs, warmup))


def candidates(model, block_index: int, batch: int, bundle=None):
    """name -> (callable, outputs (xa, xb) of one call) for every candidate; caches start random."""
    import onnxruntime as ort

    from sejd.engines import native

    cfg = model.config
    T, H, hd, D = cfg.num_tokens, cfg.num_heads, cfg.head_dim, cfg.token_dim
    block = model.blocks[block_index]
    pos = T // 2
    g = np.random.default_rng(0)
    x = g.standard_normal((batch, D)).astype(np.float32)
    caches = [g.standard_normal((batch, H, T, hd)).astype(np.float32) for _ in range(2 * cfg.layers_per_block)]
    temps = np.ones(batch, np.float32)
    labels = np.full(batch, -1, np.int64) if cfg.num_classes else None
    module = StepRowsGraph(block, T, bool(cfg.num_classes))
    args = [torch.from_numpy(x)[:, None], torch.tensor(pos), *map(torch.from_numpy, caches)]
    args += ([torch.from_numpy(labels)] if cfg.num_classes else []) + [torch.from_numpy(temps), torch.zeros(2, T)]

    def pytorch():
        with torch.no_grad():
            return module(*args)

    out = {"pytorch": (pytorch, lambda: [o[:, 0].numpy() for o in pytorch()[:2]])}

    def session(model_bytes, threads):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])

    if bundle is not None:
        from sejd.export.contracts import contract

        c = contract(cfg, "step_rows")
        path = bundle.path / "engines" / "ort-cpu" / bundle.graph("step_rows", block_index)["file"]
        sess = session(str(path), 1)
        names = {i.name for i in sess.get_inputs()}
        feeds = dict(zip(c.input_names, [a.numpy() for a in args]))
        feeds = {k: v for k, v in feeds.items() if k in names}
        binding = sess.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        for o in sess.get_outputs():
            binding.bind_output(o.name, "cpu")

        def onnx_step(s=sess, b=binding):
            s.run_with_iobinding(b)

        out["onnx step_rows"] = (onnx_step, lambda s=sess: [o[:, 0] for o in s.run(None, feeds)[:2]])
    if not cfg.num_classes and block.nvp:
        contrib = contrib_step_graph(block, T).SerializeToString()
        for threads in (1, os.cpu_count()):
            sess = session(contrib, threads)
            shared = [c.copy() for c in caches]
            binding = sess.io_binding()
            binding.bind_cpu_input("x", x)
            binding.bind_cpu_input("pos", np.array(pos, np.int64))
            binding.bind_cpu_input("seqlens", np.full(batch, pos, np.int32))
            binding.bind_cpu_input("total", np.array(pos + 1, np.int32))
            for i, c in enumerate(shared):  # past and present share one buffer: the key/value written in place
                name = f"{i // 2}.{('key', 'value')[i % 2]}"
                binding.bind_cpu_input(f"past.{name}", c)
                binding.bind_output(f"present.{name}", "cpu", 0, np.float32, list(c.shape), c.ctypes.data)
            binding.bind_output("p", "cpu")

            def contrib_step(s=sess, b=binding):
                s.run_with_iobinding(b)

            def contrib_out(s=sess, b=binding):
                s.run_with_iobinding(b)
                p = b.get_outputs()[-1].numpy()  # bound last
                return [p[:, :D], p[:, D:]]

            out[f"onnx contrib ({threads} thread{'s' * (threads > 1)})"] = (contrib_step, contrib_out)
    if native.available() is None:
        nb = native.NativeBlock(block, T)
        pointers = nb.cache_pointers(caches)  # as a runner keeps them (inputs checked once, as it does)
        for threads in (1, os.cpu_count()):
            def native_step():
                return nb.step_unchecked(x, pos, pointers, labels, temps, None)

            def native_out(n=threads):
                native.set_threads(n)  # then timed on n threads: candidates run one after the other
                return [a.copy() for a in native_step()]

            out[f"native ({threads} thread{'s' * (threads > 1)})"] = (native_step, native_out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default="builtin:textures", help="checkpoint, builtin:NAME or bundle")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--block", type=int, default=1)
    p.add_argument("--shape", default=None, help="instead of SOURCE: random weights of a published shape "
                                                  "(afhq256, imagenet64, imagenet128), two blocks of it")
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    a = p.parse_args()
    torch.set_num_threads(1)
    bundle = None
    if a.shape:
        from paper_scale import SHAPES  # a sibling script

        from sejd.model.tarflow import TarFlow, TarFlowConfig

        fields = {k: v for k, v in SHAPES[a.shape].items() if k not in ("dataset", "noise_std")}
        torch.manual_seed(0)
        model = TarFlow(TarFlowConfig(**{**fields, "num_blocks": 2})).eval().requires_grad_(False)
        for b in model.blocks:  # ml-tarflow starts proj_out at zero (an identity block): give it weights
            b.proj_out.weight.data.normal_(0, 0.02)
        a.source = f"random {a.shape} block"
    elif os.path.isdir(a.source):
        from sejd.bundle import load_bundle

        bundle = load_bundle(a.source)
        model = bundle.load_model()
    else:
        model = load_checkpoint(a.source)
    rows = []
    for batch in (int(b) for b in a.batch.split(",")):
        found = candidates(model, a.block, batch, bundle)
        want = found["pytorch"][1]()
        for name, (call, outputs) in found.items():
            err = max(float(np.abs(g - w).max()) for g, w in zip(outputs(), want))
            seconds = timed(call, a.runs if name != "pytorch" else a.runs // 4, a.warmup)
            rows.append({"candidate": name, "batch": batch, "us_median": seconds * 1e6, "max_abs_vs_pytorch": err})
            print(f"batch {batch:>3} {name:<26} {seconds * 1e6:9.1f} us   max |err| {err:.1e}", file=sys.stderr)
    print(json.dumps({"source": a.source, "block": a.block, "position": model.config.num_tokens // 2, "rows": rows},
                     indent=1))


if __name__ == "__main__":
    main()
