"""Memory estimates made before allocating, so a batch or a model that cannot fit fails at once with the
bytes it needs and the bytes there are, instead of swapping, hanging or dying in an allocator traceback.

Estimates count float32 tensors from the config alone; they are meant to catch the absurd (a batch
of ten million images), not to predict the peak to the byte.
"""

from __future__ import annotations

import dataclasses

from sejd.core.errors import InputError

FLOAT_BYTES = 4
MEMINFO = "/proc/meminfo"


def format_bytes(n: float) -> str:
    """Decimal units, as `df -H` and most people read them: 7.9 GB."""
    units = ("bytes", "KB", "MB", "GB", "TB", "PB")
    k = 0
    while n >= 1000 and k < len(units) - 1:
        n, k = n / 1000, k + 1
    return f"{n:.0f} bytes" if k == 0 else f"{n:.1f} {units[k]}" if n < 1000 else f"{n:.3g} {units[k]}"


def noise_bytes(n: int, num_tokens: int, token_dim: int) -> int:
    """(n, T, D) float32: the prior noise of n samples (and, in the same shape, their images)."""
    return n * num_tokens * token_dim * FLOAT_BYTES


@dataclasses.dataclass
class Estimate:
    parts: dict[str, int]  # what -> bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def without(self, *names: str) -> "Estimate":
        return Estimate({k: v for k, v in self.parts.items() if k not in names})

    def describe(self) -> str:
        return ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts.items())


def sampling_estimate(cfg, batch: int, guided: bool = False) -> Estimate:
    """The working set of sampling `batch` images: noise, the images and the iterates a decoder keeps, the
    KV caches of ONE block (blocks run one at a time, so the runtime can share one cache pool), and the
    widest activation of one parallel pass. Guidance doubles the rows that go through the transformer."""
    rows = batch * (2 if guided else 1)
    T, C = cfg.num_tokens, cfg.channels
    per_image = noise_bytes(batch, T, cfg.token_dim)
    return Estimate({
        "noise": per_image,
        # the block's input, its decoded output, the Jacobi iterate before it and the images
        "images and iterates": 4 * per_image,
        "KV caches of one block": rows * cfg.layers_per_block * 2 * cfg.num_heads * T * cfg.head_dim * FLOAT_BYTES,
        "one parallel pass": rows * T * C * cfg.expansion * FLOAT_BYTES,  # the MLP's hidden layer
        # attention scores of one layer (rows x heads x T x T), built by the math attention paths
        "attention scores": rows * cfg.num_heads * T * T * FLOAT_BYTES,
    })


def _is_cuda(device) -> bool:
    return device is not None and str(device).startswith("cuda")


def available_bytes(device=None) -> int | None:
    """Free memory where tensors for `device` live: the GPU's free memory for a CUDA device, else the host's
    MemAvailable; None where that is unknown (no /proc/meminfo)."""
    if _is_cuda(device):
        import torch
        # memory PyTorch's allocator holds but does not use is free for the next allocation too
        return int(torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                   - torch.cuda.memory_allocated(device))
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(nbytes: int, what: str, device=None, advice: str = "") -> None:
    """Refuse with an InputError naming the bytes needed and the bytes available when `what` cannot fit in
    memory; skipped where the available memory is unknown."""
    available = available_bytes(device)
    if available is not None and nbytes > available:
        where = "GPU memory free" if _is_cuda(device) else "memory available (MemAvailable)"
        raise InputError(f"{what} needs about {format_bytes(nbytes)}, more than the {format_bytes(available)} "
                         f"of {where}{f'; {advice}' if advice else ''}")
