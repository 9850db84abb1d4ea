"""One definition of a seeded sampling request, shared by every entry point.

`sejd sample`, the HTTP service, the Triton model, `bench`, `tune`, `check` and the demo all turn
(n, seed, label) into noise and labels here, and the service's per-sample plans come from
`per_sample_plan`, so `sejd sample --per-sample` and a served request give the same images bit for bit.
"""

from __future__ import annotations

import copy

import torch

from sejd.core.errors import InputError
from sejd.core.memory import check_fits, noise_bytes

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed
# classifier-free guidance accepted from users (CLI and service): past ~10 it already saturates images;
# 100 leaves room while keeping every intermediate finite (1e6 overflowed the engines and answered 500)
GUIDANCE_MAX = 100.0


def check_seed(seed) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise InputError(f"seed must be an integer in 0..2**63-1, got {str(seed)[:40]}")
    return seed


def seeded_text(n: int, seed: int, length: int, width: int) -> torch.Tensor:
    """(n, length, width) float32 stand-in text embeddings drawn from `torch.Generator().manual_seed(seed)`
    (a STARFlow's calibration text when the user gives none: real prompts' embeddings tune better)."""
    g = torch.Generator().manual_seed(check_seed(seed) ^ 0x7E47)  # not the noise's own stream
    return torch.randn(n, length, width, generator=g)


def seeded_noise(n: int, seed: int, num_tokens: int, token_dim: int) -> torch.Tensor:
    """(n, T, D) float32 prior noise drawn from `torch.Generator().manual_seed(seed)`: a request's samples
    depend on its own seed only, whatever batch it rides in. Refused before allocating when it cannot fit."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"the number of samples must be an integer >= 1, got {str(n)[:40]}")
    g = torch.Generator().manual_seed(check_seed(seed))
    check_fits(noise_bytes(n, num_tokens, token_dim), f"the prior noise of {n} samples ({n} x {num_tokens} x "
               f"{token_dim} float32)", advice="ask for fewer samples")
    return torch.randn(n, num_tokens, token_dim, generator=g)


def seeded_labels(n: int, label: int | None, num_classes: int) -> torch.Tensor | None:
    """The given label for every sample (-1: unconditional), else classes in turn for conditional models,
    else None."""
    if label is not None:
        return torch.full((n,), label, dtype=torch.long)
    return torch.arange(n) % num_classes if num_classes else None


def per_sample_plan(plan):
    """A copy of `plan` in which every sample stops on its own residual, so its result does not depend on
    the rest of its batch: Jacobi blocks become per-sample host Jacobi, and GS-Jacobi blocks (which stop a
    segment on the batch's largest residual) per-sample Jacobi at the same tau. `"reference"` is returned
    unchanged."""
    if isinstance(plan, str):
        return plan
    plan = copy.deepcopy(plan)
    for b in plan.blocks:
        if b.decoder in ("jacobi", "gs-jacobi"):
            b.decoder, b.variant, b.freeze, b.per_sample, b.segments = "jacobi", "host", False, True, 1
    return plan
