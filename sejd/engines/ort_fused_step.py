"""ort-cpu's fused single-token step: one flow block's `step_rows` computation as a graph of ONNX Runtime's
fused CPU operators (Gemm with the bias, SkipLayerNormalization, Gelu, GroupQueryAttention), built by hand
from the block's fp32 PyTorch weights rather than traced: a group of nodes per op of the block's declared layer
(sejd/model/block.py), each weight under its declared name; an op kind it has no nodes for fails the build of
that block's graph, which then is not shipped (the manifest says why).

Why: the traced `step_rows` graph is ~150 small nodes at two layers (index arithmetic, the attention spelled
out), and ONNX Runtime pays a dispatch for each. This graph has 11 nodes per layer plus 13 (15 for a
conditional model), and GroupQueryAttention writes the token's key/value into the KV cache itself: the
cache is bound as both its past input and its present output (the runner's own buffers, through IO
binding), so nothing is copied per token. It is what ort-cpu runs single tokens with where the native step
(sejd/engines/native.py) is not used, and it answers to the `step_rows` contract: `sejd build` ships it per
block only where it matches the PyTorch reference within that contract's tolerance (`compare`), and
`sejd check` compares it again.

How the graph expresses the contract (rows R = B, or 2B with guidance, conditional rows first):

- rows: the B tokens' embeddings are gathered into R rows (`rows` = r mod B);
- labels (-1 = unconditional, the class mean): a table of the class embeddings with their mean appended as
  the last row, gathered with the labels (any negative label is mapped to -1 once per batch);
- per-row attention temperature: GroupQueryAttention has one scale for every row, so each row's queries are
  multiplied by 1/temp before the attention (`qkv_scale`, R x 3C: 1/temp on the query features, 1 on the
  keys and values), the model's own `q / temp`;
- guidance: the proj_out rows of the conditional and unconditional halves (`cond_rows`, `uncond_rows`) mixed
  as c + w (c - u), w being the guidance weight of this position for each output feature (`guidance_table`,
  T x P: xa's weight on xa's features, xb's on xb's); without guidance rows u = c and the output is c;
- caches (R, H, T, hd) written at `pos`: GroupQueryAttention with seqlens_k = pos and a total length of
  pos + 1 attends to positions [0, pos] and writes the token's key/value at pos, in place when its present
  outputs are bound to its past inputs' memory.

The per-batch inputs (`rows`, `cond_rows`, `uncond_rows`, `qkv_scale`, `labels`, `guidance_table`) are made
from the conditioning once per batch by `conditioning_inputs`; `FusedStep` binds them, the caches and
buffers for the per-call inputs (`x`, `pos`, `seqlens`, `total`) and outputs once, so a call writes four
small buffers and runs.

Weights are stored as the exported graphs store them (each Linear's weight transposed, (in, out), as
Gemm's B; biases, LayerNorm parameters and the permuted position table as they are), so the engine
folder's content-addressed weight file holds them once for every graph of the block.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from sejd.core.errors import InputError

log = logging.getLogger("sejd.ort")

FUSED_VARIANT = "step_fused"
# graphs that ort-cpu's build adds to the bundle's declared variants; each must have a parity test
ENGINE_VARIANTS = (FUSED_VARIANT,)
CONTRACT = "step_rows"  # the contract the fused step answers to (inputs, outputs, tolerance)
OPSET = 18
PER_CALL_INPUTS = ("x", "pos", "seqlens", "total")
# build-time parity: batch 1 and 3, plain and with guidance rows (two seeds for batch 3)
PARITY_FEEDS = ((1, False, 1), (1, True, 2), (3, False, 3), (3, True, 4), (3, True, 5))


def unsupported(spec) -> str | None:
    """None when the fused step graph computes blocks of this declaration, else why not: it is made of TarFlow's
    ops (learned positions, exp scale, TarFlow guidance); the runners keep the exported step_rows graph."""
    from sejd.engines.native import starflow_options

    starflow = starflow_options(spec)
    return f"the fused step graph runs TarFlow blocks; this block has STARFlow options ({starflow})" if starflow else None


def dims_of(spec) -> dict:
    """The sizes the graph is built for, from the block's declaration (a BlockSpec, sejd/model/block.py)."""
    return {"T": spec.num_tokens, "D": spec.token_dim, "C": spec.channels, "H": spec.heads, "hd": spec.head_dim,
            "L": spec.layers, "P": spec.out_dim, "nvp": bool(spec.nvp), "classes": spec.num_classes}


def cache_names(layers: int) -> list[str]:
    return [f"{l}.{kv}" for l in range(layers) for kv in ("key", "value")]


def fused_step_graph(block, num_tokens: int):
    """The fused single-token step of `block` (a MetaBlock of the fp32 model) as an ONNX ModelProto.

    Inputs: x (B, D); pos () int64; seqlens (R,) int32 = pos; total () int32 = pos + 1; rows (R,) int64;
    cond_rows, uncond_rows (B,) int64; qkv_scale (R, 3C); labels (R,) int64 (conditional models);
    guidance_table (T, P); past.L.key/value (R, H, T, hd). Outputs: xa, xb (B, D) (guided); present.L.*
    (R, H, T, hd): the caches with the token written at pos (bind them to the past inputs' memory)."""
    from onnx import TensorProto, helper, numpy_helper

    spec = block.spec  # the declared block (sejd/model/block.py): one group of nodes per declared op
    d = dims_of(spec)
    if num_tokens != d["T"]:
        raise ValueError(f"the block has {d['T']} tokens, not {num_tokens}")
    T, D, C, H, hd, P = d["T"], d["D"], d["C"], d["H"], d["hd"], d["P"]
    inits, nodes = [], []
    params = block.state_dict()

    def weight(name, t):
        a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        a = np.ascontiguousarray(a.astype(np.float32) if a.dtype.kind == "f" else a)
        inits.append(numpy_helper.from_array(a, name))
        return name

    def declared(name, op, transposed=False):
        """An op's declared weight (a Linear's transposed, (in, out): as the exported graphs store it, and
        Gemm's B), then its bias where it has one (Gemm's C, LayerNormalization's B: optional inputs)."""
        w = params[f"{name}.weight"]
        out = [weight(f"{name}.weight.T", w.T) if transposed else weight(f"{name}.weight", w)]
        return out + ([weight(f"{name}.bias", params[f"{name}.bias"])] if op.bias else [])

    def node(op, ins, outs, domain="", **kw):
        nodes.append(helper.make_node(op, ins, outs, domain=domain, name=f"{op}_{len(nodes)}", **kw))
        return outs[0] if len(outs) == 1 else outs

    def gemm(a, name, op, out):
        return node("Gemm", [a, *declared(name, op, transposed=True)], [out])

    hx = gemm("x", "proj_in", spec.proj_in, "h_x")  # (B, C)
    h = node("Gather", [hx, "rows"], ["h_rows"], axis=0)  # (R, C): row r is sample r mod B
    pe = node("Gather", [weight("pos_table", block.permute(params["pos_embed"], dim=0)), "pos"], ["pos_row"], axis=0)
    h = node("Add", [h, pe], ["h_pos"])
    if d["classes"]:  # the class rows, then their mean: label -1 gathers the last row
        table = params["class_embed"][:, 0]
        classes = weight("class_table", torch.cat([table, table.mean(0, keepdim=True)]))
        h = node("Add", [h, node("Gather", [classes, "labels"], ["class_rows"], axis=0)], ["h0"])
    weight("qkv_shape", np.array([0, 1, -1], np.int64))
    weight("row_shape", np.array([-1, C], np.int64))

    # The residual stream (R, C) is `stream` + `pending`: an op that adds into it leaves its output pending,
    # and the next LayerNorm makes the add itself (SkipLayerNormalization), else an Add does.
    stream, pending = h, None

    def settle(tag):
        nonlocal stream, pending
        if pending is not None:
            stream, pending = node("Add", [pending, stream], [f"{tag}.stream"]), None
        return stream

    for i in range(spec.layers):
        x = None  # the previous op's output; None: the op reads the residual stream
        for op in spec.layer:
            name = f"attn_blocks.{i}.{op.name}"
            tag = name if op.name else f"attn_blocks.{i}.{op.kind}"
            if op.kind == "layer_norm":
                scale_shift = declared(name, op)
                if x is None and pending is not None:  # the pending add, fused into this LayerNorm
                    y, _, _, stream = node("SkipLayerNormalization", [pending, stream, *scale_shift],
                                           [tag, f"{tag}.mean", f"{tag}.inv_std", f"{tag}.stream"],
                                           domain="com.microsoft", epsilon=op.eps)
                    pending = None
                else:
                    y = node("LayerNormalization", [stream if x is None else x, *scale_shift], [tag], axis=-1,
                             epsilon=op.eps)
            elif op.kind == "linear":
                y = gemm(settle(tag) if x is None else x, name, op, tag)
            elif op.kind == "gelu":
                y = node("Gelu", [settle(tag) if x is None else x], [tag], domain="com.microsoft")  # erf GELU
            elif op.kind == "attention":
                qkv = node("Mul", [settle(tag) if x is None else x, "qkv_scale"], [f"{tag}.qkv_t"])  # q / temp, per row
                qkv = node("Reshape", [qkv, "qkv_shape"], [f"{tag}.qkv3"])  # (R, 1, 3C): [q heads | k heads | v heads]
                att = node("GroupQueryAttention", [qkv, "", "", f"past.{i}.key", f"past.{i}.value", "seqlens", "total"],
                           [f"{tag}.heads", f"present.{i}.key", f"present.{i}.value"], domain="com.microsoft",
                           num_heads=H, kv_num_heads=H, scale=float(spec.scale))[0]
                y = node("Reshape", [att, "row_shape"], [tag])  # (R, C), heads side by side
            else:
                raise NotImplementedError(f"the fused step graph has no {op.kind!r} op")
            if op.residual:
                settle(tag)  # at most one add pending
                pending, x = y, None
            else:
                x = y
        if x is not None:
            raise NotImplementedError("the fused step graph needs each layer to end by adding into the stream")
    last = settle("h_last")
    p = gemm(last, "proj_out", spec.proj_out, "p")  # (R, P)
    c = node("Gather", [p, "cond_rows"], ["p_cond"], axis=0)  # (B, P)
    u = node("Gather", [p, "uncond_rows"], ["p_uncond"], axis=0)
    w = node("Gather", ["guidance_table", "pos"], ["w_pos"], axis=0)  # (P,)
    guided = node("Mul", [w, node("Sub", [c, u], ["c_minus_u"])], ["w_diff"])
    if d["nvp"]:
        node("Split", [node("Add", [c, guided], ["guided"]), weight("split", np.array([D, D], np.int64))],
             ["xa", "xb"], axis=1)
    else:  # volume-preserving: xa is zero
        node("Add", [c, guided], ["xb"])
        node("ConstantOfShape", [node("Shape", ["x"], ["x_shape"])], ["xa"],
             value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))

    F, I64, I32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    cache = ["R", H, T, hd]
    vi = helper.make_tensor_value_info
    inputs = [vi("x", F, ["B", D]), vi("pos", I64, []), vi("seqlens", I32, ["R"]), vi("total", I32, []),
              vi("rows", I64, ["R"]), vi("cond_rows", I64, ["B"]), vi("uncond_rows", I64, ["B"]),
              vi("qkv_scale", F, ["R", 3 * C])]
    inputs += [vi("labels", I64, ["R"])] if d["classes"] else []
    inputs += [vi("guidance_table", F, [T, P])]
    inputs += [vi(f"past.{n}", F, cache) for n in cache_names(d["L"])]
    outputs = [vi("xa", F, ["B", D]), vi("xb", F, ["B", D])]
    outputs += [vi(f"present.{n}", F, cache) for n in cache_names(d["L"])]
    graph = helper.make_graph(nodes, FUSED_VARIANT, inputs, outputs, inits)
    return helper.make_model(graph, producer_name="sejd",
                             opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])


def conditioning_inputs(dims: dict, batch: int, labels, temps, guidance) -> dict[str, np.ndarray]:
    """The graph's per-batch inputs from the step_rows conditioning: labels (R,) int64 (-1 = unconditional;
    ignored without classes), temps (R,) float32, guidance (2, T) float32 (used when R == 2B)."""
    temps = np.asarray(temps, np.float32)
    R, B, C, D, P, T = temps.shape[0], batch, dims["C"], dims["D"], dims["P"], dims["T"]
    if R not in (B, 2 * B):
        raise InputError(f"{FUSED_VARIANT}: rows must be batch or 2*batch (guidance), got rows={R} for batch={B}")
    scale = np.ones((R, 3 * C), np.float32)
    scale[:, :C] = (1 / temps)[:, None]
    table = np.zeros((T, P), np.float32)
    if R == 2 * B and guidance is not None:  # each output feature's weight: xa's features, then xb's
        g = np.asarray(guidance, np.float32)
        table[:] = np.repeat(g.T, D, axis=1) if dims["nvp"] else np.repeat(g[1][:, None], D, axis=1)
    feeds = {"rows": np.arange(R, dtype=np.int64) % B, "cond_rows": np.arange(B, dtype=np.int64),
             "uncond_rows": np.arange(R - B, R, dtype=np.int64), "qkv_scale": scale, "guidance_table": table}
    if dims["classes"]:
        feeds["labels"] = np.where(np.asarray(labels) < 0, -1, labels).astype(np.int64)
    return feeds


class FusedStep:
    """The fused step graph of one block, bound for one batch: the conditioning once, the KV caches in place
    (each bound as a past input and as the matching present output), the per-call inputs and the outputs as
    buffers this object owns. `caches`: the (R, H, T, hd) float32 arrays, in `cache_names` order; they must
    stay put while this object is used."""

    def __init__(self, session, dims: dict, batch: int, cond: dict, caches):
        R = cond["rows"].shape[0]
        self.session, self.cond = session, cond  # cond's arrays are bound: kept alive here
        self.x = np.zeros((batch, dims["D"]), np.float32)
        self.pos, self.total = np.zeros((), np.int64), np.zeros((), np.int32)
        self.seqlens = np.zeros(R, np.int32)
        self.xa, self.xb = np.zeros_like(self.x), np.zeros_like(self.x)
        shape = (R, dims["H"], dims["T"], dims["hd"])
        names = cache_names(dims["L"])
        if len(caches) != len(names) or any(c.shape != shape or c.dtype != np.float32 or not c.flags.c_contiguous
                                            for c in caches):
            raise InputError(f"{FUSED_VARIANT}: expected {len(names)} contiguous float32 caches of shape {shape}")
        self.caches = caches
        b = self.binding = session.io_binding()
        for name, arr in (*cond.items(), ("x", self.x), ("pos", self.pos), ("seqlens", self.seqlens),
                          ("total", self.total)):
            b.bind_cpu_input(name, arr)  # by reference: the buffers are written before each run
        for name, arr in (("xa", self.xa), ("xb", self.xb)):
            b.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        for name, c in zip(names, caches):  # past and present are one buffer: the key/value written in place
            b.bind_cpu_input(f"past.{name}", c)
            b.bind_output(f"present.{name}", "cpu", 0, np.float32, list(shape), c.ctypes.data)

    def __call__(self, x: np.ndarray, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """x (B, D) float32 at position `pos` (checked by the caller: 0 <= pos < T) -> guided (xa, xb) (B, D),
        fresh arrays; the caches get the token's keys/values at `pos`."""
        np.copyto(self.x, x)
        self.pos[()] = pos
        self.seqlens[:] = pos
        self.total[()] = pos + 1
        self.session.run_with_iobinding(self.binding)
        return self.xa.copy(), self.xb.copy()


def fused_call_on_feeds(session, dims: dict, feeds: dict) -> dict[str, np.ndarray]:
    """Run the fused step on step_rows feeds (x (B, 1, D), pos, past.*, labels, temps, guidance) on copies of
    their caches -> the step_rows outputs (xa, xb (B, 1, D), new.* (R, H, 1, hd)) and `unchanged`: the
    largest change anywhere in the caches but at `pos` (0 when the step writes only its own position)."""
    x = np.asarray(feeds["x"], np.float32)
    batch, pos = x.shape[0], int(feeds["pos"])
    names = cache_names(dims["L"])
    caches = [np.array(feeds[f"past.{n}"], np.float32, order="C") for n in names]
    cond = conditioning_inputs(dims, batch, feeds.get("labels"), feeds["temps"], feeds["guidance"])
    xa, xb = FusedStep(session, dims, batch, cond, caches)(x[:, 0], pos)
    out = {"xa": xa[:, None], "xb": xb[:, None]}
    elsewhere = 0.0
    for n, c in zip(names, caches):
        out[f"new.{n}"] = c[:, :, pos:pos + 1].copy()
        before = np.asarray(feeds[f"past.{n}"])
        for part in (slice(0, pos), slice(pos + 1, None)):  # compared in place: published-size caches are large
            a, b = c[:, :, part], before[:, :, part]
            if a.size and not np.array_equal(a, b, equal_nan=True):
                changed = float(np.abs(a - b).max())
                elsewhere = max(elsewhere, changed if math.isfinite(changed) else math.inf)
    out["unchanged"] = np.array(elsewhere, np.float32)
    return out


def compare(session, dims: dict, model, k: int, all_feeds, atol: float, rtol: float = 0.0) -> dict:
    """The fused step of block `k` against the PyTorch reference on step_rows feeds: Polygraphy's rule per
    element (|a - b| <= atol + rtol |b|) on every step_rows output, and the caches untouched but at `pos`.
    Returns {passed, max_abs, worst_output, per_output_max_abs, inputs}."""
    from sejd.export.contracts import contract
    from sejd.export.oracle import reference_outputs

    c = contract(model.config, CONTRACT)
    worst, passed = {}, True
    for feeds in all_feeds:
        got = fused_call_on_feeds(session, dims, feeds)
        for name, want in reference_outputs(model, k, c, feeds).items():
            diff = np.abs(got[name] - want)
            err = float(diff.max()) if diff.size else 0.0
            worst[name] = max(worst.get(name, 0.0), err if math.isfinite(err) else math.inf)
            passed = passed and bool(np.all(diff <= atol + rtol * np.abs(want)))
        worst["unchanged"] = max(worst.get("unchanged", 0.0), float(got["unchanged"]))
        passed = passed and float(got["unchanged"]) == 0.0
    max_abs = max(worst.values())
    return {"passed": passed and math.isfinite(max_abs), "max_abs": max_abs, "worst_output": max(worst, key=worst.get),
            "per_output_max_abs": worst, "inputs": len(all_feeds)}


def parity_feeds(cfg, seeds=PARITY_FEEDS) -> list[dict]:
    """Seeded step_rows inputs: batch 1 and 3, plain and with guidance rows, labels incl. -1."""
    from sejd.export.contracts import contract, dummy_inputs

    c = contract(cfg, CONTRACT)
    return [dummy_inputs(c, cfg, batch=b, cfg_rows=rows, seed=seed) for b, rows, seed in seeds]


def build_fused_steps(bundle, model, out: Path, store, scratch: Path, threads=None, show_progress=True):
    """`sejd build --backend ort-cpu` (fp32): the fused step of every block, optimised by ONNX Runtime, its
    weights moved into the block's weight file (stored once with the other graphs'), then compared with the
    PyTorch reference (`compare`, the step_rows contract's tolerance, `parity_feeds`); a block whose graph
    fails is not shipped. Returns (files {rel: sha256}, the engine manifest's record)."""
    import onnx
    import onnxruntime as ort

    from sejd.core.util import progress
    from sejd.engines.ort import _share_weights, session_options
    from sejd.export.bundle import sha256_file
    from sejd.export.contracts import contract

    cfg = model.config
    reasons = [unsupported(block.spec) for block in model.blocks]
    if all(reasons):  # e.g. STARFlow: nothing to build (its contracts are per block, not TarFlow's)
        record = not_built_record(len(reasons), reasons[0])
        record["blocks"] = {str(k): {"used": False, "reason": r} for k, r in enumerate(reasons)}
        for k, r in enumerate(reasons):
            log.info("ort-cpu build: block %d keeps the ONNX step_rows graph for single tokens (%s)", k, r)
        return {}, record
    atol = contract(cfg, CONTRACT).atol
    feeds = parity_feeds(cfg)
    files, blocks = {}, {}
    for k, block in enumerate(progress(model.blocks, desc="build fused steps", enabled=show_progress)):
        rel = f"blocks/{k}/{FUSED_VARIANT}.onnx"
        if reasons[k]:
            blocks[str(k)] = {"used": False, "reason": reasons[k]}
            continue
        target = out / rel
        try:
            graph = fused_step_graph(block, cfg.num_tokens)
            raw = scratch / FUSED_VARIANT / str(k) / "graph.onnx"
            raw.parent.mkdir(parents=True, exist_ok=True)
            onnx.save_model(graph, raw, save_as_external_data=True, all_tensors_to_one_file=True,
                            location="graph.onnx.data", size_threshold=1024)
            target.parent.mkdir(parents=True, exist_ok=True)
            ort.InferenceSession(str(raw), session_options(threads, target), providers=["CPUExecutionProvider"])
            _share_weights(target, rel, store)
            session = ort.InferenceSession(str(target), session_options(1, level="none"),
                                           providers=["CPUExecutionProvider"])
            result = compare(session, dims_of(block.spec), model, k, feeds, atol)
        except OSError:  # a full disk is not the graph's fault
            raise
        except Exception as e:  # an onnxruntime without these operators, a kernel that refuses the shapes
            result = {"passed": False, "error": f"onnxruntime {ort.__version__}: {type(e).__name__}: "
                                                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
        if result["passed"]:
            files[rel] = sha256_file(target)
            blocks[str(k)] = {"used": True, "file": rel, "max_abs": result["max_abs"],
                              "worst_output": result["worst_output"], "inputs": result["inputs"]}
            continue
        for leftover in (target, target.with_name(target.name + ".data")):
            leftover.unlink(missing_ok=True)
        if "error" in result:
            reason = f"the fused step graph does not run: {result['error']}"
        else:
            reason = (f"parity failed against the PyTorch reference: max abs error {result['max_abs']:.3g} on "
                      f"{result['worst_output']} (tolerance {atol:g}, {result['inputs']} seeded inputs)")
        blocks[str(k)] = {"used": False, "reason": reason}
        log.warning("ort-cpu build: block %d keeps the ONNX step_rows graph for single tokens (%s)", k, reason)
    record = {"contract": CONTRACT, "atol": atol, "onnxruntime": ort.__version__,
              "parity_inputs": [{"batch": b, "guidance_rows": r, "input_seed": s} for b, r, s in PARITY_FEEDS],
              "blocks": blocks}
    return files, record


def not_built_record(num_blocks: int, reason: str) -> dict:
    """The engine manifest's record where no fused step is built (e.g. fp16 engines)."""
    return {"contract": CONTRACT, "blocks": {str(k): {"used": False, "reason": reason} for k in range(num_blocks)}}
