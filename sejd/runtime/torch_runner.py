"""The PyTorch block runner: the reference model's block with a static, preallocated KV cache
(views of the model's one KV-cache pool, shared by all its blocks)."""

from __future__ import annotations

import torch

from sejd.model.block import guide, rows
from sejd.model.tarflow import MetaBlock, TarFlow
from sejd.runtime.runner import BlockRunner, Conditioning, KVCachePool


class TorchBlockRunner(BlockRunner):
    def __init__(self, block: MetaBlock, num_tokens: int, token_dim: int, pool: KVCachePool | None = None):
        self.block, self.num_tokens, self.token_dim = block, num_tokens, token_dim
        self.pool = pool or KVCachePool()
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.batch = self.rows = 0

    def begin(self, batch: int, cond: Conditioning) -> None:
        p = self.block.pos_embed
        self.batch, self.rows = batch, cond.rows
        self.class_term = self.block.class_term(cond.labels.to(p.device))  # (R, 1, C) or None
        temps = cond.temps.to(p.device)
        self.temp = 1.0 if bool((temps == 1).all()) else temps
        self.guidance = None if cond.guidance is None else cond.guidance.to(p.device, p.dtype)
        spec = self.block.spec
        shape = (self.rows, spec.heads, self.num_tokens, spec.head_dim)
        # positions are read only after this batch wrote them, so what another block left is harmless
        views = self.pool.caches(2 * spec.layers, shape, p.dtype, p.device)
        self.cache = list(zip(views[0::2], views[1::2]))

    @torch.no_grad()
    def project(self, x, start):
        n = x.shape[1]
        xa, xb = self.block.project(rows(x, self.rows), start, self.class_term, self.cache, self.temp)  # (R, n, D)
        w = None if self.guidance is None else self.guidance[:, start:start + n]  # (2, n)
        return guide(xa, xb, w, self.batch)


def torch_runners(model: TarFlow) -> list[TorchBlockRunner]:
    cfg = model.config
    pool = KVCachePool()  # one per set of runners: freed with them, shared by their blocks
    return [TorchBlockRunner(b, cfg.num_tokens, cfg.token_dim, pool) for b in model.blocks]
