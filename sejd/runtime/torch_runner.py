"""The PyTorch block runner: the reference model's block with a static, preallocated KV cache
(views of the model's one KV-cache pool, shared by all its blocks)."""

from __future__ import annotations

import torch

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
        attn = self.block.attn_blocks[0].attention
        shape = (self.rows, attn.num_heads, self.num_tokens, p.shape[1] // attn.num_heads)
        # positions are read only after this batch wrote them, so what another block left is harmless
        views = self.pool.caches(2 * len(self.block.attn_blocks), shape, p.dtype, p.device)
        self.cache = list(zip(views[0::2], views[1::2]))

    @torch.no_grad()
    def project(self, x, start):
        n = x.shape[1]
        groups = self.rows // self.batch
        rows = x.repeat(groups, 1, 1) if groups > 1 else x  # (R, n, D): [cond rows | uncond rows]
        xa, xb = self.block.project(rows, start, self.class_term, self.cache, self.temp)
        if self.guidance is None:
            return xa, xb
        w = self.guidance[:, start:start + n, None]  # (2, n, 1)
        xa_c, xa_u = xa.chunk(2)
        xb_c, xb_u = xb.chunk(2)
        return xa_c + w[0] * (xa_c - xa_u), xb_c + w[1] * (xb_c - xb_u)


def torch_runners(model: TarFlow) -> list[TorchBlockRunner]:
    cfg = model.config
    pool = KVCachePool()  # one per set of runners: freed with them, shared by their blocks
    return [TorchBlockRunner(b, cfg.num_tokens, cfg.token_dim, pool) for b in model.blocks]
