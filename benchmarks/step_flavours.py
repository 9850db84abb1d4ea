"""Latency of the single-token `step_rows` graph as exported (guidance rows, per-row temperature) against
a guidance-free flavour (no row selection, no guidance mixing), one ONNX Runtime thread, median of 200.

    python benchmarks/step_flavours.py builtin:textures
"""

from __future__ import annotations

import argparse
import statistics
import time

import onnxruntime as ort
import torch

from sejd import load_checkpoint
from sejd.export import graphs
from sejd.export.contracts import contract, dummy_inputs
from sejd.export.onnx_export import _to_onnx


def session(model, plain: bool):
    cfg = model.config
    c = contract(cfg, "step_rows")
    g = graphs.StepRowsGraph(model.blocks[-1], cfg.num_tokens, bool(cfg.num_classes))
    if plain:
        g.rows = lambda x, temps: x
        g.guide = lambda xa, xb, w, batch: (xa, xb)
    feeds = dummy_inputs(c, cfg, batch=2)
    onnx_model = _to_onnx(g, tuple(torch.from_numpy(feeds[n]) for n in c.input_names), c.input_names,
                          c.output_names, c.dynamic_axes(), 18)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(onnx_model.SerializeToString(), so), len(onnx_model.graph.node), c


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", nargs="?", default="builtin:textures")
    p.add_argument("--batch", default="1,16")
    a = p.parse_args()
    model = load_checkpoint(a.source)
    for plain in (False, True):
        sess, nodes, c = session(model, plain)
        names = {i.name for i in sess.get_inputs()}
        for batch in (int(b) for b in a.batch.split(",")):
            feeds = {k: v for k, v in dummy_inputs(c, model.config, batch=batch).items() if k in names}
            for _ in range(20):
                sess.run(None, feeds)
            times = []
            for _ in range(200):
                t0 = time.perf_counter()
                sess.run(None, feeds)
                times.append(time.perf_counter() - t0)
            print(f"{'guidance-free' if plain else 'as exported  '} {nodes:4d} nodes  batch {batch:3d}: "
                  f"{statistics.median(times) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
