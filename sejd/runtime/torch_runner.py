"""The PyTorch block runner: the reference model's block with a static, preallocated KV cache
(views of the model's one KV-cache pool, shared by all its blocks)."""

from __future__ import annotations

import torch

from sejd.core.errors import InputError
from sejd.model.block import guide, rows
from sejd.model.tarflow import MetaBlock
from sejd.runtime.runner import BlockRunner, Conditioning, KVCachePool


class TorchBlockRunner(BlockRunner):
    def __init__(self, block: MetaBlock, num_tokens: int, token_dim: int, pool: KVCachePool | None = None):
        self.block, self.num_tokens, self.token_dim = block, num_tokens, token_dim
        self.pool = pool or KVCachePool()
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.batch = self.rows = 0

    def begin(self, batch: int, cond: Conditioning) -> None:
        p = self.block.proj_in.weight
        spec = self.block.spec
        # ml-starflow guides only the blocks with a text prefix; the others run the B conditional rows
        guided = cond.guidance is not None and (spec.guidance == "tarflow" or spec.text_width > 0)
        self.batch, self.rows = batch, cond.rows if guided else batch
        self.class_term = self.block.class_term(cond.labels[:self.rows].to(p.device))  # (R, 1, C) or None
        temps = cond.temps[:self.rows].to(p.device)
        self.temp = 1.0 if bool((temps == 1).all()) else temps
        self.guidance = cond.guidance.to(p.device, p.dtype) if guided else None
        shape = (self.rows, spec.heads, spec.text_length + self.num_tokens, spec.head_dim)
        # positions are read only after this batch wrote them, so what another block left is harmless
        views = self.pool.caches(2 * spec.layers, shape, p.dtype, p.device)
        self.cache = list(zip(views[0::2], views[1::2]))
        if spec.text_width:  # the text prefix fills cache slots [0, Lt)
            if cond.text is None or cond.text.shape[0] < self.rows:
                raise InputError(f"this block is text-conditioned: the conditioning must hold {self.rows} rows of "
                                 f"text embeddings, got {None if cond.text is None else tuple(cond.text.shape)}")
            with torch.no_grad():
                self.block.prefix(cond.text[:self.rows].to(p.device), self.cache, self.temp)

    @torch.no_grad()
    def project(self, x, start):
        n = x.shape[1]
        xa, xb = self.block.project(rows(x, self.rows), start, self.class_term, self.cache, self.temp)  # (R, n, D)
        w = None if self.guidance is None else self.guidance[:, start:start + n]  # (2, n)
        return guide(xa, xb, w, self.batch, self.block.spec.guidance)


def torch_runners(model) -> list[TorchBlockRunner]:
    """One runner per block of a TarFlow or a StarFlow; a STARFlow block runs as spec.run_tokens = T + 1."""
    pool = KVCachePool()  # one per set of runners: freed with them, shared by their blocks
    return [TorchBlockRunner(b, b.spec.run_tokens, b.spec.token_dim, pool) for b in model.blocks]
