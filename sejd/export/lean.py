"""Tracing a block whose weights are too large to copy (STARFlow 3B's deep block: 10.9 GB in float32).

`torch.onnx.export` holds a module's parameters, and constant-folds transposed copies of them, while it traces:
a second copy of the block. A lean trace swaps the block's parameters, for the trace only, for placeholders of
their shapes that own one float each (zero strides), with constant folding off, so every parameter a graph uses
stays an initializer under its own name. The real tensors are read back one at a time, in float32, when the
graph's initializers go into the bundle's weight file (`weights.externalize(..., sources=...)`): memory holds
one tensor of the block at a time, whatever its dtype in the checkpoint (bf16 mapped from disk, or float32).

Each placeholder holds its own value: the exporter merges initializers of equal content, which would merge
equal-shaped placeholders and lose their names. ONNX Runtime folds the transposes when it builds the engines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# a block whose float32 weights are larger than this is traced lean (the 3B's shallow blocks, 0.91 GB, are not)
LEAN_BLOCK_BYTES = 2 * 2**30


def float32_bytes(module: nn.Module) -> int:
    return 4 * sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def placeholders(module: nn.Module) -> Iterator[None]:
    """Within the block, every parameter is a zero-stride float32 placeholder whose `lean_source` is the real
    tensor; floating buffers are float32 copies (small: none in a STARFlow block today). Restored on exit."""
    swapped = []
    try:
        for owner in module.modules():
            for name, p in list(owner._parameters.items()):
                if p is None:
                    continue
                value = 1e-4 * (len(swapped) + 1)  # distinct per parameter (see the module's docstring)
                stand_in = nn.Parameter(torch.full((), value).expand(p.shape), requires_grad=False)
                stand_in.lean_source = p
                swapped.append((owner._parameters, name, p))
                owner._parameters[name] = stand_in
            for name, b in list(owner._buffers.items()):
                if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                    swapped.append((owner._buffers, name, b))
                    owner._buffers[name] = b.float()
        yield
    finally:
        for table, name, original in reversed(swapped):
            table[name] = original


def lean_sources(module: nn.Module) -> dict[str, torch.Tensor]:
    """The traced module's placeholder parameters by the name the exporter gives their initializers."""
    return {name: p.lean_source for name, p in module.named_parameters() if hasattr(p, "lean_source")}


def float32_data(tensor: torch.Tensor) -> bytes:
    """One real tensor's bytes as the graph stores it (float32, little-endian, row-major)."""
    return tensor.detach().to(torch.float32).contiguous().numpy().tobytes()
