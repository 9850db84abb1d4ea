"""Exact sequential sampling that keeps what the analysis compares against: every block's input and
exact output, in the block's own token order, in sampling order."""

from __future__ import annotations

import dataclasses
import math

import torch

from sejd.runtime.decoders import sequential
from sejd.runtime.runner import Conditioning


@dataclasses.dataclass
class BlockTrace:
    block: int  # model block index
    z: torch.Tensor  # (B, T, D) the block's input (what sampling hands it)
    exact: torch.Tensor  # (B, T, D) its exact sequential decoding


@dataclasses.dataclass
class Trace:
    blocks: list[BlockTrace]  # in sampling order (blocks[-1] first)
    images: torch.Tensor  # (B, C, H, W) exact samples
    labels: torch.Tensor | None
    cond: Conditioning


def exact_trace(model, runners, noise: torch.Tensor, labels=None, bar=None) -> Trace:
    """Decode `noise` (B, T, D) exactly, block by block, with `runners` (one per model block)."""
    cfg = model.config
    cond = Conditioning.build(noise.shape[0], cfg.num_tokens, labels)
    with torch.no_grad():
        x = noise.to(model.var.device) * model.var.sqrt()
    blocks = []
    for k in reversed(range(cfg.num_blocks)):
        z = model.blocks[k].permute(x)
        runners[k].begin(noise.shape[0], cond)
        exact = sequential(runners[k], z, bar=bar).x
        blocks.append(BlockTrace(k, z, exact))
        x = model.blocks[k].permute(exact)
    return Trace(blocks, model.unpatchify(x), labels, cond)


def block_psnr(x: torch.Tensor, exact: torch.Tensor) -> float:
    """PSNR (dB) of a block's output against its exact decoding, the peak being the exact output's range
    (max - min over the batch): scale-free across blocks whose latents span different ranges, and for
    the last sampling block, whose output is the image in [-1, 1], close to sejd's image PSNR."""
    mse = float((x.float() - exact.float()).pow(2).mean())
    peak = float(exact.max() - exact.min())
    return math.inf if mse == 0 else (-math.inf if not math.isfinite(mse) else 10 * math.log10(peak**2 / mse))
