"""The block-runner interface: what one flow block can do, whatever executes it.

Every decoder in `sejd.runtime.decoders` is written once against this interface; the PyTorch
reference, ONNX Runtime and TensorRT backends implement it. All tensors crossing it are torch
tensors in the block's own (permuted) token order, shape (B, n, D).

The one primitive is `project(x, start)`: affine parameters for tokens at positions
[start, start+n) given a KV cache that holds positions [0, start). The call writes the window's
own keys/values at [start, start+n), so the cache's valid prefix is simply "everything before the
position you pass next": decoders commit by moving `start` forward and roll back by passing an
earlier `start` (later positions are scratch and get overwritten).

Classifier-free guidance runs conditional and unconditional rows in one batch of R = 2B rows
(cond rows first); a runner returns the guided parameters for the B samples.

STARFlow (sejd/model/starflow.py) is run through the same interface: its block over T image tokens is
T + 1 runtime tokens whose token 0 is the start token (x_0 = z_0 = sos_embed, given), and the text block's
KV cache holds the text prefix first (`begin` writes it; positions are runtime positions, the offset is the
block's business). Its text rides in `Conditioning.text`; guidance doubles only the text block's rows
(ml-starflow guides the deep block only; the other blocks run the B conditional rows, without text).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import resource
import sys

import torch

from sejd.core.errors import InputError
from sejd.core.memory import check_fits
from sejd.model.block import affine


@dataclasses.dataclass
class Conditioning:
    """Per-row conditioning of a batch of B samples run as R = B or 2B rows."""

    labels: torch.Tensor  # (R,) int64, -1 = unconditional (class mean); ignored by unconditional models
    temps: torch.Tensor  # (R,) float32 attention temperature per row
    guidance: torch.Tensor | None  # (2, T) weights for xa / xb at each projection position, when R == 2B
    text: torch.Tensor | None = None  # (R, Lt, Dt) STARFlow text embeddings: cond rows, then uncond rows

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor, batch: int) -> "Conditioning":
        """The conditioning of samples `index` (of a batch of `batch`): their cond rows, then their
        uncond rows when guidance doubles the batch."""
        rows = torch.cat([index, index + batch]) if self.rows == 2 * batch else index
        return Conditioning(self.labels[rows], self.temps[rows], self.guidance,
                            None if self.text is None else self.text[rows])

    @classmethod
    def build_text(cls, batch: int, num_tokens: int, text: torch.Tensor | None, uncond_text: torch.Tensor | None,
                   guidance: float = 0.0) -> "Conditioning":
        """STARFlow: text (B, Lt, Dt) and, with guidance > 0, the unconditional text (B, Lt, Dt) as rows
        [cond; uncond] (ml-starflow's doubled batch). ml-starflow has no guidance schedule (its annealing
        argument has no effect, FACTS section 6): the weight is w at every position, read from row 0."""
        labels = torch.full((batch,), -1, dtype=torch.long)
        if not guidance > 0 or text is None:
            return cls(labels, torch.ones(batch), None, text)
        w = torch.full((2, num_tokens), float(guidance))
        return cls(torch.cat([labels, labels]), torch.ones(2 * batch), w, torch.cat([text, uncond_text]))

    @classmethod
    def build(cls, batch: int, num_tokens: int, labels: torch.Tensor | None = None, guidance: float = 0.0,
              guide_what: str = "ab", attn_temp: float = 1.0, annealed_guidance: bool = False) -> "Conditioning":
        """ml-tarflow's CFG: `xa += g*(xa - xa_uncond)` for 'a' in guide_what (same for xb), where the
        unconditional pass uses attention temperature `attn_temp`, and g = (i+1)/(T-1)*guidance
        at step i when annealed."""
        cond = labels if labels is not None else torch.full((batch,), -1, dtype=torch.long)
        if not (guidance > 0 and guide_what):
            return cls(cond, torch.ones(batch), None)
        if set(guide_what) - set("ab"):
            raise InputError(f"guide_what must be made of 'a' and 'b', got {guide_what!r}")
        T = num_tokens
        g = (torch.arange(T, dtype=torch.float32) + 1) / (T - 1) * guidance if annealed_guidance \
            else torch.full((T,), float(guidance))
        weights = torch.stack([g * ("a" in guide_what), g * ("b" in guide_what)])  # (2, T)
        labels2 = torch.cat([cond, torch.full((batch,), -1, dtype=torch.long)])
        temps = torch.cat([torch.ones(batch), torch.full((batch,), float(attn_temp))])
        return cls(labels2, temps, weights)


class BlockRunner(abc.ABC):
    """One flow block. Subclasses implement `begin` and `project`; engines may override the fused ops."""

    num_tokens: int  # T
    token_dim: int  # D
    # what runs this block's single tokens (step and sequential blocks); recorded in plans and results
    single_token_path: str = "PyTorch"

    @abc.abstractmethod
    def begin(self, batch: int, cond: Conditioning) -> None:
        """Prepare for a batch of `batch` samples: bind the conditioning, make the KV cache ready."""

    @abc.abstractmethod
    def project(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, n, D) at positions [start, start+n) -> guided (xa, xb), each (B, n, D).

        Output j parameterises token start+j+1. Writes the window's KV at [start, start+n).
        """

    # Fused operations. The defaults below define their semantics; engine runners run them as
    # one graph call and must agree with these definitions.

    def step(self, x_tok: torch.Tensor, pos: int) -> torch.Tensor:
        """Sequential step: token `pos` (B, D) -> token pos+1's affine parameters, applied later."""
        xa, xb = self.project(x_tok[:, None], pos)
        return xa[:, 0], xb[:, 0]

    def jacobi_iter(self, z: torch.Tensor, x: torch.Tensor, start: int = 1, end: int | None = None):
        """One parallel Jacobi update of target tokens [start, end) of x (B, T, D), given z.

        Tokens outside the window are unchanged; positions < start-1 must be in the KV cache.
        Returns (x_next (B, T, D), residual (B,) = max |x_next - x| over the window).
        """
        end = self.num_tokens if end is None else end
        inp = x[:, start - 1:end - 1]
        if start == 1:  # token 0 is z_0 by definition, whatever x holds
            inp = torch.cat([z[:, :1], inp[:, 1:]], dim=1)
        xa, xb = self.project(inp, start - 1)
        window = affine(z[:, start:end], xa, xb)
        residual = (window - x[:, start:end]).abs().amax(dim=(1, 2))
        x_next = x.clone()
        x_next[:, start:end] = window
        if start == 1:
            x_next[:, 0] = z[:, 0]
        return x_next, residual

    def jacobi_chunk(self, z: torch.Tensor, x: torch.Tensor, k: int):
        """k full Jacobi iterations -> (x after k, residuals (k, B)); engines run K of them unrolled."""
        residuals = []
        for _ in range(k):
            x, res = self.jacobi_iter(z, x)
            residuals.append(res)
        return x, torch.stack(residuals)

    def jacobi_loop(self, z: torch.Tensor, x: torch.Tensor, tau: float, cap: int):
        """Full Jacobi iterations until max residual < tau (or NaN) or `cap` of them, as one engine call (an
        ONNX Loop) -> (x, residual (B,), iterations); None where this runner has none (the decoder then
        iterates from the host)."""
        return None

    def sequential_loop(self, z: torch.Tensor) -> torch.Tensor | None:
        """The exact sequential inversion of the block as one engine call; None where this runner has none."""
        return None

    @property
    def one_call(self) -> frozenset:
        """Which of `jacobi_chunk`, `jacobi_loop` and `sequential_loop` this runner runs as one engine call (or
        one captured graph). The others fall back to the host-driven definitions above: the same result at no
        gain, so `sejd tune` does not time them."""
        return frozenset()

    def check_input(self, z: torch.Tensor, batch: int) -> None:
        expected = (batch, self.num_tokens, self.token_dim)
        if tuple(z.shape) != expected:
            raise InputError(f"block input must have shape {expected} (batch, tokens, token width), "
                             f"got {tuple(z.shape)}")


class KVCachePool:
    """One set of KV-cache buffers shared by every block runner of a model.

    Blocks are decoded one at a time, so a single set of caches sized for the largest batch x rows
    seen serves all of them (as gpt-fast keeps one static cache); a runner takes views of it in
    `begin`. The buffers are flat and reallocated only when a larger size (more rows or buffers, or
    another dtype or device) is asked for; each reallocation bumps `generation`, so runners that
    captured CUDA graphs over the old addresses know to capture again. Smaller shapes are views at
    the same addresses. What a view holds on `begin` is whatever the previous block left: runners
    either never read positions they have not written (their contract) or zero the views."""

    def __init__(self):
        self._flat: list[torch.Tensor] = []
        self.generation = 0

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self._flat)

    def caches(self, count: int, shape: tuple, dtype=torch.float32, device="cpu") -> list[torch.Tensor]:
        """`count` cache tensors of `shape`, views of the pool's storage (the same for every caller)."""
        numel, device = math.prod(shape), torch.device(device)
        have = self._flat[0] if self._flat else None
        if have is None or len(self._flat) < count or have.numel() < numel or have.dtype != dtype \
                or have.device != device:
            keep = have is not None and have.dtype == dtype and have.device == device
            numel = max(numel, have.numel() if keep else 0)
            count = max(count, len(self._flat) if keep else 0)
            self._flat = []  # free the old set before allocating the new one
            check_fits(count * numel * torch.empty((), dtype=dtype).element_size(),
                       f"the KV caches for this batch ({count} buffers of shape {tuple(shape)}: rows x heads x "
                       f"tokens x head_dim)", device, advice="sample a smaller batch")
            self._flat = [torch.zeros(numel, dtype=dtype, device=device) for _ in range(count)]
            self.generation += 1
        size = math.prod(shape)
        return [f[:size].view(shape) for f in self._flat[:count]]


def peak_rss_bytes() -> int:
    """The peak resident memory of this process so far, in bytes (ru_maxrss is in KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
