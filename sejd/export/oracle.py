"""The contract oracle: what every graph variant must compute, evaluated with the PyTorch reference
(runner + decoders).

Parity checks (`sejd check`, the tests) feed the same inputs to an engine and to `reference_outputs`.
"""

from __future__ import annotations

import numpy as np
import torch

from sejd.export.contracts import GraphContract
from sejd.model.tarflow import TarFlow
from sejd.runtime.decoders import jacobi, sequential
from sejd.runtime.runner import Conditioning
from sejd.runtime.torch_runner import TorchBlockRunner


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def conditioning_from_feeds(feeds: dict, batch: int, spec=None) -> Conditioning:
    """The Conditioning a graph's feeds stand for. A STARFlow text block (`spec`) gets the feeds' text, or zeros
    (its graphs that read the prefix from caches or inputs: the reference's prefix is then overwritten)."""
    temps = _t(feeds["temps"]) if "temps" in feeds else torch.ones(feeds["text"].shape[0])
    labels = _t(feeds["labels"]) if "labels" in feeds else torch.full(temps.shape, -1, dtype=torch.long)
    rows = temps.shape[0]
    guidance = _t(feeds["guidance"]) if rows == 2 * batch and "guidance" in feeds else None
    text = None
    if spec is not None and spec.text_width:
        text = _t(feeds["text"]) if "text" in feeds else torch.zeros(rows, spec.text_length, spec.text_width)
    return Conditioning(labels, temps, guidance, text)


def reference_outputs(model, block, c, feeds) -> dict[str, np.ndarray]:
    return {k: np.array(v, order="C") for k, v in _reference_outputs(model, block, c, feeds).items()}


@torch.no_grad()
def _reference_outputs(model: TarFlow, block: int | None, c: GraphContract, feeds: dict) -> dict[str, np.ndarray]:
    if c.variant == "forward":
        labels = _t(feeds["labels"]) if "labels" in feeds else None
        z, _, logdet = model(_t(feeds["image"]), labels)
        return {"z": z.numpy(), "logdet": logdet.numpy()}
    spec = model.blocks[block].spec
    Lt = spec.text_length  # STARFlow text block: runtime position p is cache slot Lt + p
    if c.variant == "prefix":
        text = _t(feeds["text"])
        runner = TorchBlockRunner(model.blocks[block], spec.run_tokens, spec.token_dim)
        runner.begin(text.shape[0], conditioning_from_feeds(feeds, text.shape[0], spec))
        out = {}
        for l, (k, v) in enumerate(runner.cache):
            out[f"prefix.{l}.key"], out[f"prefix.{l}.value"] = k[:, :, :Lt].numpy(), v[:, :, :Lt].numpy()
        return out
    first = _t(feeds["x"] if "x" in feeds else feeds["z"])
    batch = first.shape[0]
    runner = TorchBlockRunner(model.blocks[block], spec.run_tokens, spec.token_dim)
    cond = conditioning_from_feeds(feeds, batch, spec)
    runner.begin(batch, cond)
    if Lt and "prefix.0.key" in feeds:  # the Jacobi graphs of a text block take the prefix as inputs
        for l, (k, v) in enumerate(runner.cache):
            k[:, :, :Lt], v[:, :, :Lt] = _t(feeds[f"prefix.{l}.key"]), _t(feeds[f"prefix.{l}.value"])
    if c.variant == "step_rows":
        runner.cache = [(_t(feeds[f"past.{l}.key"]).clone(), _t(feeds[f"past.{l}.value"]).clone())
                        for l in range(spec.layers)]
        pos = int(feeds["pos"])
        xa, xb = runner.project(first, pos)
        out = {"xa": xa.numpy(), "xb": xb.numpy()}
        slot = Lt + pos
        for l, (k, v) in enumerate(runner.cache):
            out[f"new.{l}.key"], out[f"new.{l}.value"] = k[:, :, slot:slot + 1].numpy(), v[:, :, slot:slot + 1].numpy()
        return out
    if c.variant in ("step_present", "window"):
        runner.cache = [(_t(feeds[f"past.{l}.key"]).clone(), _t(feeds[f"past.{l}.value"]).clone())
                        for l in range(spec.layers)]
        start = int(feeds["pos" if c.variant == "step_present" else "start"])
        xa, xb = runner.project(first, start)
        out = {"xa": xa.numpy(), "xb": xb.numpy()}
        for l, (k, v) in enumerate(runner.cache):
            out[f"present.{l}.key"], out[f"present.{l}.value"] = k.numpy(), v.numpy()
        return out
    z = _t(feeds["z"])
    if c.variant == "jacobi":
        x_next, res = runner.jacobi_iter(z, _t(feeds["x"]))
        return {"x_next": x_next.numpy(), "residual": res.numpy()}
    if c.variant == "jacobi_k":
        x, residuals = _t(feeds["x"]), []
        for _ in range(c.unroll):
            x, res = runner.jacobi_iter(z, x)
            residuals.append(res)
        return {"x_next": x.numpy(), "residual": res.numpy(), "residuals": torch.stack(residuals).numpy()}
    if c.variant == "jacobi_loop":
        out = jacobi(runner, z, _t(feeds["x0"]), float(feeds["tau"]), int(feeds["max_iters"]), finish_exactly=False)
        return {"x": out.x.numpy(), "residual": out.last_residual.numpy(),
                "iterations": np.array(out.iterations, dtype=np.int64)}
    if c.variant == "sequential_loop":
        return {"x": sequential(runner, z).x.numpy()}
    raise ValueError(c.variant)
