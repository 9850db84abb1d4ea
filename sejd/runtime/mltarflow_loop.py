"""A faithful re-implementation of ml-tarflow's own sampling loop: the `reference` speed baseline.

As in ml-tarflow's `MetaBlock.reverse`: one token per step, the KV cache of every attention layer is
a Python list grown by `torch.cat` at each step, and guidance runs a second, unconditional pass with
its own cache. Published SJD speed-ups are measured against this loop.

It is also an oracle for the rest of sejd, so it states ml-tarflow's layer itself (attention and MLP, from
the modules' weights) rather than running sejd's block definition (sejd/model/block.py).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from sejd.model.tarflow import MetaBlock, TarFlow


def _attention_step(attn, x, cache, temp, head_dim):
    B, n, C = x.shape
    h = attn.norm(x.float()).type(x.dtype)
    q, k, v = attn.qkv(h).reshape(B, n, 3 * (C // head_dim), -1).transpose(1, 2).chunk(3, dim=1)
    cache["k"].append(k)
    cache["v"].append(v)
    k, v = torch.cat(cache["k"], dim=2), torch.cat(cache["v"], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5 / temp)
    return attn.proj(out.transpose(1, 2).reshape(B, n, C))


def _mlp(mlp, x):
    """ml-tarflow's MLP: its norm, then its `main` (Linear, GELU, Linear)."""
    return mlp.main(mlp.norm(x.float()).type(x.dtype))


def _reverse_step(block: MetaBlock, x, pos_embed, i, class_term, caches, temp):
    h = block.proj_in(x[:, i:i + 1]) + pos_embed[i:i + 1]
    if class_term is not None:
        h = h + class_term
    for layer, cache in zip(block.attn_blocks, caches):
        h = h + _attention_step(layer.attention, h, cache, temp, block.spec.head_dim)
        h = h + _mlp(layer.mlp, h)
    return block.split(block.proj_out(h))


def reference_block_reverse(block: MetaBlock, x, y=None, guidance=0.0, guide_what="ab", attn_temp=1.0,
                            annealed_guidance=False):
    x = block.permute(x).clone()
    pos_embed = block.permute(block.pos_embed, dim=0)
    caches = {w: [{"k": [], "v": []} for _ in block.attn_blocks] for w in ("cond", "uncond")}
    cond_term, uncond_term = block.class_term(y), block.class_term(None)
    T = x.shape[1]
    for i in range(T - 1):
        za, zb = _reverse_step(block, x, pos_embed, i, cond_term, caches["cond"], 1.0)
        if guidance > 0 and guide_what:
            za_u, zb_u = _reverse_step(block, x, pos_embed, i, uncond_term, caches["uncond"], attn_temp)
            g = (i + 1) / (T - 1) * guidance if annealed_guidance else guidance
            if "a" in guide_what:
                za = za + g * (za - za_u)
            if "b" in guide_what:
                zb = zb + g * (zb - zb_u)
        x[:, i + 1] = x[:, i + 1] * za[:, 0].float().exp().type(za.dtype) + zb[:, 0]
    return block.permute(x)


@torch.no_grad()
def reference_sample(model: TarFlow, noise, labels=None, guidance=0.0, guide_what="ab", attn_temp=1.0,
                     annealed_guidance=False, progress=True):
    from sejd.core.util import progress as progress_bar
    from sejd.runtime.sampler import BlockStats, SampleResult, SampleStats

    T = model.config.num_tokens
    x = noise * model.var.sqrt()
    stats, started = [], time.perf_counter()
    blocks = list(reversed(range(model.config.num_blocks)))
    for order, k in enumerate(progress_bar(blocks, desc="reference (ml-tarflow loop)", enabled=progress)):
        t0 = time.perf_counter()
        x = reference_block_reverse(model.blocks[k], x, labels, guidance, guide_what, attn_temp, annealed_guidance)
        stats.append(BlockStats(k, order, "reference", T - 1, time.perf_counter() - t0, 0.0))
    return SampleResult(model.unpatchify(x), SampleStats("reference", stats, time.perf_counter() - started))
