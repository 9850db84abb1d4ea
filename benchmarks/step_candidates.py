"""The candidates for the CPU single-token step, side by side in one process (issue: a CPU step near the
arithmetic floor). One block of the model, one token at the middle of the sequence, median of --runs calls:

- `pytorch`: the exported step module (`StepRowsGraph`) in PyTorch eager, one thread;
- `onnx step_rows`: the bundle's exported graph as ONNX Runtime runs it (optimised at level "all");
- `onnx fused`: the fused step graph ort-cpu ships (`sejd/engines/ort_fused_step.py`: Gemm with the bias,
  SkipLayerNormalization, Gelu, GroupQueryAttention writing this token's key/value into a cache bound as
  both past and present, so nothing is copied), called as the runners call it (`FusedStep`), on 1 and all
  cores;
- `native`: sejd's C step (`sejd/engines/native/step.c`), what ort-cpu runners use, on 1 and all cores.

"All cores" is the cores this process may run on, the same count for both. Each candidate's outputs are
compared with the PyTorch module first (max abs error printed). JSON on stdout.

    python benchmarks/step_candidates.py builtin:textures --batch 1,16
    python benchmarks/step_candidates.py --shape afhq256 --batch 1   # one random block of a published shape
    python benchmarks/step_candidates.py --shape textures --batch 1  # ... or of a shipped model's shape
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
from sejd.engines.ort_fused_step import (
    FusedStep,
    conditioning_inputs,
    dims_of,
    fused_step_graph,
)
from sejd.export.graphs import StepRowsGraph

BUILTIN_SHAPES = ("digits", "textures")  # --shape: the shipped models' configs, random weights


def timed(fn, runs: int, warmup: int) -> float:
    from variant_latency import (
        call_times,  # a sibling script (benchmarks/ is on the path when run)
    )

    return statistics.median(call_times(fn, runs, warmup))


def thread_counts() -> tuple[int, ...]:
    """1 and all the cores this process may run on (the native step's default), for every multi-thread candidate."""
    from sejd.engines.native import default_threads

    return tuple(dict.fromkeys((1, default_threads())))


def threads_of(name: str) -> int:
    """The intra-op threads a candidate runs on: `(N thread[s])` in its name, else 1."""
    return int(name.rsplit("(", 1)[1].split()[0]) if name.endswith(("thread)", "threads)")) else 1


def random_model(shape: str):
    """Two blocks of random weights at a published shape (paper_scale.SHAPES) or a shipped model's."""
    from sejd.model.tarflow import TarFlow, TarFlowConfig

    if shape in BUILTIN_SHAPES:
        fields = load_checkpoint(f"builtin:{shape}").config.to_dict()
    else:
        from paper_scale import SHAPES  # a sibling script

        if shape not in SHAPES:
            raise SystemExit(f"--shape: expected one of {sorted(SHAPES) + list(BUILTIN_SHAPES)}, got {shape!r}")
        fields = {k: v for k, v in SHAPES[shape].items() if k not in ("dataset", "noise_std")}
    torch.manual_seed(0)
    model = TarFlow(TarFlowConfig(**{**fields, "num_blocks": 2})).eval().requires_grad_(False)
    for b in model.blocks:  # ml-tarflow starts proj_out at zero (an identity block): give it weights
        b.proj_out.weight.data.normal_(0, 0.02)
    return model


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
    fused = fused_step_graph(block, T).SerializeToString()
    dims = dims_of(block.spec)
    for threads in thread_counts():
        # the token's key/value is written into these caches in place, at the same position every call
        step = FusedStep(session(fused, threads), dims, batch, conditioning_inputs(dims, batch, labels, temps, None),
                         [c.copy() for c in caches])

        def fused_step(f=step):
            return f(x, pos)

        out[f"onnx fused ({threads} thread{'s' * (threads > 1)})"] = (fused_step, lambda f=step: list(f(x, pos)))
    if native.available() is None:
        nb = native.NativeBlock(block, T)
        pointers = nb.cache_pointers(caches)  # as a runner keeps them (inputs checked once, as it does)
        for threads in thread_counts():
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
                                                  "(afhq256, imagenet64, imagenet128) or a shipped model's "
                                                  "(textures, digits), two blocks of it")
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    a = p.parse_args()
    torch.set_num_threads(1)
    bundle = None
    if a.shape:
        model = random_model(a.shape)
        a.source = f"random {a.shape} block"
    elif os.path.isdir(a.source):
        from sejd.export.bundle import load_bundle

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
            rows.append({"candidate": name, "batch": batch, "threads": threads_of(name), "us_median": seconds * 1e6,
                         "max_abs_vs_pytorch": err})
            print(f"batch {batch:>3} {name:<26} {seconds * 1e6:9.1f} us   max |err| {err:.1e}", file=sys.stderr)
    print(json.dumps({"source": a.source, "block": a.block, "position": model.config.num_tokens // 2, "rows": rows},
                     indent=1))


if __name__ == "__main__":
    main()
