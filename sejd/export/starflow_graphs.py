"""Export-friendly modules of a STARFlow block (sejd/model/starflow.py), one per graph variant, derived from the
block definition like `graphs.py`'s: the block's own layers (`run_layer`), rope (`apply_rope` with the spec's
angle table, a graph constant), final RMSNorm, `split` (soft clip, softplus scale) and `guide(kind=spec.guidance)`.

The runtime sees a STARFlow block as T + 1 tokens (token 0 the start token, fed by the runtime: `to_runner`), so
graphs take runtime tokens; runtime position p is KV-cache slot Lt + p, whose rope row it uses. A text block's
cache holds the text prefix in slots [0, Lt): the `prefix` graph computes it once per batch (text -> each layer's
rotated keys and values), the cached graphs read it from their cache inputs and the Jacobi graph takes it as
inputs (the text is never recomputed). No class term, no learned positions; the attention temperature is 1
(the temps input carries the rows and is all ones: ml-starflow's attn_temp is not supported).
"""

from __future__ import annotations

import torch
from torch import nn

from sejd.export.graphs import MaskedAttention, PastAndSelf, ScatteredCache, attend, reduced_block
from sejd.model.block import affine, apply_rope, guide, rows, run_layer, split


class Roped:
    """Rotate the call's queries and keys by their slots' angles (cos, sin (n, hd)), then attend with `inner`
    (which so sees, caches and returns rotated keys, as MetaBlock's cache holds them)."""

    def __init__(self, inner, cos, sin):
        self.inner, self.cos, self.sin = inner, cos, sin

    def __call__(self, q, k, v, scale):
        return self.inner(apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin), v, scale)


class Captured(MaskedAttention):
    """MaskedAttention that keeps the call's (rotated) keys and values: the prefix graph's outputs."""

    def __call__(self, q, k, v, scale):
        self.kv = [k.float(), v.float()]
        return super().__call__(q, k, v, scale)


class PrefixAndSelf:
    """The call's tokens over a given text prefix (R, H, Lt, hd) and themselves, as `mask` (n, Lt + n) allows."""

    def __init__(self, prefix_k, prefix_v, mask, dtype):
        self.k, self.v, self.mask, self.dtype = prefix_k, prefix_v, mask, dtype

    def __call__(self, q, k, v, scale):
        k_all = torch.cat([self.k.to(self.dtype), k], dim=2)
        v_all = torch.cat([self.v.to(self.dtype), v], dim=2)
        return attend(q, k_all, v_all, self.mask, scale)


class StarGraph(nn.Module):
    """One STARFlow block: the pieces every variant shares (embedding, rope rows by slot, output head)."""

    def __init__(self, block, dtype: torch.dtype = torch.float32):
        super().__init__()
        block = reduced_block(block, dtype)
        spec = block.spec
        self.block, self.spec, self.dtype = block, spec, dtype
        self.Lt, self.S, self.T = spec.text_length, spec.cache_slots, spec.run_tokens
        self.H, self.hd = spec.heads, spec.head_dim
        ang = spec.rope_angles()  # float64, cast once (MetaBlock.rope_rows does the same)
        self.register_buffer("rope_cos", ang.cos().to(dtype))
        self.register_buffer("rope_sin", ang.sin().to(dtype))

    def embed(self, x, R: int):
        """Runtime tokens x (B, n, D) -> rows (R, n, C) entering the first layer."""
        return self.block.proj_in(rows(x, R).to(self.dtype))

    def rope(self, slots):
        return self.rope_cos.index_select(0, slots), self.rope_sin.index_select(0, slots)

    def output(self, h, w, batch):
        """The last layer's rows -> guided (xa, xb) (B, n, D) in float32 (final norm, soft clip, softplus)."""
        if self.spec.final_norm:
            h = self.block.final_norm(h)
        xa, xb = split(self.spec, self.block.proj_out(h))
        return guide(xa, xb, w, batch, self.spec.guidance)

    def pasts(self, rest):
        L = self.spec.layers
        return [(rest[2 * i], rest[2 * i + 1]) for i in range(L)], rest[2 * L:]

    def cached(self, x, start, pasts, temps, guidance):
        """Window x (B, n, D) at runtime positions start + [0, n) (slots Lt + ...) over caches (R, H, S, hd)."""
        B, n, _ = x.shape
        positions = start + torch.arange(n, device=x.device)
        slots = positions + self.Lt
        h = self.embed(x, temps.shape[0])
        R = h.shape[0]
        mask = torch.arange(self.S, device=x.device).view(1, -1) <= slots.view(-1, 1)  # (n, S)
        index = slots.view(1, 1, n, 1).expand(R, self.H, n, self.hd)
        cos, sin = self.rope(slots)
        presents = []
        for layer, past in zip(self.block.attn_blocks, pasts):
            cache = ScatteredCache(past, index, mask, self.dtype)
            h = run_layer(self.spec, layer, h, Roped(cache, cos, sin), temps)
            presents += cache.present
        return (*self.output(h, guidance.index_select(1, positions), B), *presents)


class StarPrefixGraph(StarGraph):
    """text (R, Lt, Dt) -> prefix.{l}.key (rope applied), prefix.{l}.value (R, H, Lt, hd) for every layer."""

    def forward(self, text):
        h = self.block.proj_txt(text.to(self.dtype))
        slots = torch.arange(self.Lt, device=text.device)
        cos, sin = self.rope(slots)
        causal = slots.view(1, -1) <= slots.view(-1, 1)
        out = []
        for layer in self.block.attn_blocks:
            cap = Captured(causal)
            h = run_layer(self.spec, layer, h, Roped(cap, cos, sin), 1.0)
            out += cap.kv
        return tuple(out)


class StarStepRowsGraph(StarGraph):
    """x (B, 1, D), pos, read-only caches -> xa, xb, and the token's own (rotated) keys/values new.* (R, H, 1, hd)
    that the host writes at slot Lt + pos."""

    def forward(self, x, pos, *rest):
        pasts, (temps, guidance) = self.pasts(rest)
        h = self.embed(x, temps.shape[0])
        slot = (pos + self.Lt).view(1)
        cos, sin = self.rope(slot)
        before = (torch.arange(self.S, device=x.device) < slot).view(1, 1, 1, -1)
        news = []
        for layer, past in zip(self.block.attn_blocks, pasts):
            cache = PastAndSelf(past, before, self.dtype)
            h = run_layer(self.spec, layer, h, Roped(cache, cos, sin), temps)
            news += cache.new
        return (*self.output(h, guidance.index_select(1, pos.view(1)), x.shape[0]), *news)


class StarWindowGraph(StarGraph):
    """step_present and window: x (B, n, D) at `start`, caches -> xa, xb, the caches with the window written."""

    def forward(self, x, start, *rest):
        pasts, (temps, guidance) = self.pasts(rest)
        return self.cached(x, start, pasts, temps, guidance)


class StarJacobiGraph(StarGraph):
    """z, x (B, T + 1, D) [, the text prefix's keys/values] -> one parallel Jacobi iteration (x_next, residual)
    over runtime tokens 1..T; `iterations` > 1: unrolled (jacobi_k)."""

    def __init__(self, block, iterations: int = 1, dtype=torch.float32):
        super().__init__(block, dtype)
        self.iterations = iterations

    def iterate(self, z, x, prefix, temps, guidance):
        inp = torch.cat([z[:, :1], x[:, 1:-1]], dim=1)  # token 0 (the start token) is z_0 by definition
        n = inp.shape[1]
        h = self.embed(inp, temps.shape[0])
        positions = torch.arange(n, device=z.device)
        cos, sin = self.rope(positions + self.Lt)
        causal = positions.view(1, -1) <= positions.view(-1, 1)
        if self.Lt:
            mask = torch.cat([torch.ones(n, self.Lt, dtype=torch.bool, device=z.device), causal], dim=1)
        for i, layer in enumerate(self.block.attn_blocks):
            att = PrefixAndSelf(prefix[2 * i], prefix[2 * i + 1], mask, self.dtype) if self.Lt else MaskedAttention(causal)
            h = run_layer(self.spec, layer, h, Roped(att, cos, sin), temps)
        xa, xb = self.output(h, guidance[:, :n], z.shape[0])
        new = affine(z[:, 1:], xa, xb)
        return torch.cat([z[:, :1], new], dim=1), (new - x[:, 1:]).abs().amax(dim=(1, 2))

    def forward(self, z, x, *rest):
        P = 2 * self.spec.layers if self.Lt else 0
        prefix, (temps, guidance) = rest[:P], rest[P:]
        if self.iterations == 1:
            return self.iterate(z, x, prefix, temps, guidance)
        residuals = []
        for _ in range(self.iterations):
            x, res = self.iterate(z, x, prefix, temps, guidance)
            residuals.append(res)
        return x, res, torch.stack(residuals)


def graph_module(model, k: int, variant: str, unroll: int = 1, dtype=torch.float32) -> StarGraph:
    block = model.blocks[k]
    if variant == "prefix":
        return StarPrefixGraph(block, dtype).eval()
    if variant in ("step_present", "window"):
        return StarWindowGraph(block, dtype).eval()
    if variant == "step_rows":
        return StarStepRowsGraph(block, dtype).eval()
    if variant in ("jacobi", "jacobi_k"):
        return StarJacobiGraph(block, unroll if variant == "jacobi_k" else 1, dtype).eval()
    raise ValueError(f"{variant} is not a STARFlow block variant")
