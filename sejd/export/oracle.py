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


def conditioning_from_feeds(feeds: dict, batch: int) -> Conditioning:
    temps = _t(feeds["temps"])
    labels = _t(feeds["labels"]) if "labels" in feeds else torch.full(temps.shape, -1, dtype=torch.long)
    guidance = _t(feeds["guidance"]) if temps.shape[0] == 2 * batch else None
    return Conditioning(labels, temps, guidance)


def reference_outputs(model, block, c, feeds) -> dict[str, np.ndarray]:
    return {k: np.array(v, order="C") for k, v in _reference_outputs(model, block, c, feeds).items()}


@torch.no_grad()
def _reference_outputs(model: TarFlow, block: int | None, c: GraphContract, feeds: dict) -> dict[str, np.ndarray]:
    cfg = model.config
    if c.variant == "forward":
        labels = _t(feeds["labels"]) if "labels" in feeds else None
        z, _, logdet = model(_t(feeds["image"]), labels)
        return {"z": z.numpy(), "logdet": logdet.numpy()}
    first = _t(feeds["x"] if "x" in feeds else feeds["z"])
    batch = first.shape[0]
    runner = TorchBlockRunner(model.blocks[block], cfg.num_tokens, cfg.token_dim)
    cond = conditioning_from_feeds(feeds, batch)
    runner.begin(batch, cond)
    if c.variant == "step_rows":
        runner.cache = [(_t(feeds[f"past.{l}.key"]).clone(), _t(feeds[f"past.{l}.value"]).clone())
                        for l in range(cfg.layers_per_block)]
        pos = int(feeds["pos"])
        xa, xb = runner.project(first, pos)
        out = {"xa": xa.numpy(), "xb": xb.numpy()}
        for l, (k, v) in enumerate(runner.cache):
            out[f"new.{l}.key"], out[f"new.{l}.value"] = k[:, :, pos:pos + 1].numpy(), v[:, :, pos:pos + 1].numpy()
        return out
    if c.variant in ("step_present", "window"):
        runner.cache = [(_t(feeds[f"past.{l}.key"]).clone(), _t(feeds[f"past.{l}.value"]).clone())
                        for l in range(cfg.layers_per_block)]
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
