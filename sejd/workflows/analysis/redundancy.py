"""Dependency redundancy of each flow block: how much is lost when its attention sees only the last
w positions, measured as (a) the increase in negative log-likelihood of data and (b) the PSNR of the
block's exact sequential decoding against the unwindowed model's."""

from __future__ import annotations

import math

import torch

from sejd.core.errors import DecodeError
from sejd.runtime.decoders import sequential
from sejd.runtime.torch_runner import TorchBlockRunner
from sejd.workflows.analysis.trace import block_psnr
from sejd.workflows.analysis.window import windowed

ATTENTION_ELEMENTS = 2**26  # attention scores held at once by a forward pass (256 MB in fp32)


def chunk_size(model) -> int:
    """Images per forward pass, so that one layer's (images, heads, T, T) scores stay bounded at any T."""
    cfg = model.config
    return max(1, ATTENTION_ELEMENTS // (cfg.num_heads * cfg.num_tokens**2))


class Likelihood:
    """Whole-model negative log-likelihood (nats per dimension, Gaussian prior constant included) of a
    fixed set of images, with one block windowed at a time.

    The exact forward pass is run once and each block's input and log-determinant kept, so windowing
    block k reruns only blocks k.. on its stored input."""

    def __init__(self, model, images: torch.Tensor, labels: torch.Tensor | None):
        self.model = model
        self.labels = labels if model.config.num_classes else None
        self.chunks = []  # per chunk: (labels, [input to block k], [logdet of block k])
        step = chunk_size(model)
        with torch.no_grad():
            for i in range(0, len(images), step):
                y = None if self.labels is None else self.labels[i:i + step].to(model.var.device)
                x = model.patchify(images[i:i + step].to(model.var.device))
                inputs, logdets = [], []
                for block in model.blocks:
                    inputs.append(x)
                    x, logdet = block(x, y)
                    logdets.append(logdet)
                self.chunks.append((y, inputs, logdets, x))
        self.count = len(images)
        self.exact = self._mean(lambda y, inputs, logdets, z: self._nll(z, sum(logdets)))

    @staticmethod
    def _nll(z, logdet):  # per image, nats per dimension
        return 0.5 * z.pow(2).mean(dim=[1, 2]) + 0.5 * math.log(2 * math.pi) - logdet

    def _mean(self, per_chunk) -> float:
        total = sum(float(per_chunk(*c).sum()) for c in self.chunks)
        return total / self.count

    def windowed(self, k: int, window: int) -> float:
        """NLL with only block k windowed; blocks before it are unchanged, so their outputs are reused."""
        def nll(y, inputs, logdets, z):
            x, logdet = inputs[k], sum(logdets[:k], torch.zeros(()))
            with windowed(self.model.blocks[k], window, self.model.config.num_tokens):
                for block in self.model.blocks[k:]:
                    x, ld = block(x, y)
                    logdet = logdet + ld
            return self._nll(x, logdet)

        with torch.no_grad():
            return self._mean(nll)


def windowed_decode_psnr(model, trace_block, cond, window: int) -> float:
    """PSNR (dB, `block_psnr`) of block k's exact sequential decoding with window `window` against
    exact decoding of the same input; -inf when the windowed decoding leaves the finite range."""
    cfg = model.config
    runner = TorchBlockRunner(model.blocks[trace_block.block], cfg.num_tokens, cfg.token_dim)
    runner.begin(trace_block.z.shape[0], cond)
    with windowed(model.blocks[trace_block.block], window, cfg.num_tokens):
        try:
            x = sequential(runner, trace_block.z).x
        except DecodeError:
            return -math.inf
    return block_psnr(x.cpu(), trace_block.exact.cpu())


def smallest_window(windows: list[int], ok: list[bool]) -> int:
    """The smallest window from which on every larger window of the grid also meets the tolerance
    (robust to a non-monotone curve); the largest window, T, is the exact model and always does."""
    needed = windows[-1]
    for w, good in zip(reversed(windows), reversed(ok)):
        if not good:
            break
        needed = w
    return needed


def block_redundancy(model, likelihood: Likelihood, trace_block, cond, windows: list[int],
                     nll_tol: float, psnr_tol: float, bar=None) -> dict:
    T = model.config.num_tokens
    nll_increase, psnrs = [], []
    for w in windows:
        if w >= T:  # the exact model, by definition
            nll_increase.append(0.0)
            psnrs.append(math.inf)
        else:
            nll_increase.append(likelihood.windowed(trace_block.block, w) - likelihood.exact)
            psnrs.append(windowed_decode_psnr(model, trace_block, cond, w))
        if bar is not None:
            bar.update(1)
    window_nll = smallest_window(windows, [d < nll_tol for d in nll_increase])  # NaN counts as failing
    window_psnr = smallest_window(windows, [p > psnr_tol for p in psnrs])
    return {"windows": windows, "nll_increase": nll_increase, "psnr_db": psnrs,
            "diverged": [w for w, p in zip(windows, psnrs) if p == -math.inf],
            "window_nll": window_nll, "window_psnr": window_psnr, "window": max(window_nll, window_psnr)}
