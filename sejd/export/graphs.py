"""Export-friendly PyTorch modules, one per graph variant, built on the reference model's blocks: each runs
the block's own layers (`run_layer` of sejd/model/block.py) and differs only in how attention meets the
KV cache (`MaskedAttention`, `ScatteredCache`, `PastAndSelf`).

What makes them exportable: static token counts, a fixed-size KV cache written with `scatter` at an
explicit position tensor and read through a position mask (no data-dependent slicing), CFG rows
selected by index arithmetic (rows = R = B or 2B, cond rows first), and the class term computed in
the graph from int64 labels (-1 = unconditional), so one graph serves every kind of batch.
The loop variants (`jacobi_loop`, `sequential_loop`) wrap the bodies defined here in an ONNX `Loop`
(see `loops.py`).

Precision: every module takes a `dtype`. In float16/bfloat16 the weights and matrix products run in
that type while LayerNorm, the softmax and `exp` stay in float32 (their ranges overflow or lose too
much in half precision); the graph's inputs and outputs, caches included, stay float32, so every
variant keeps one contract whatever its precision (the casts sit at the graph's edges).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sejd.model.block import affine, cached_attention, guide, rows, run_layer, split
from sejd.model.tarflow import MetaBlock, TarFlow

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(precision: str) -> torch.dtype:
    from sejd.core.errors import SejdError

    if precision not in PRECISIONS:
        raise SejdError(f"unknown precision {precision!r}; expected one of {tuple(PRECISIONS)}")
    return PRECISIONS[precision]


def reduced_block(block: MetaBlock, dtype: torch.dtype) -> MetaBlock:
    """A copy of `block` with its weights in `dtype` and its LayerNorms kept in float32 (the block itself
    when it already is: modules of one runner share one reduced copy)."""
    if block.proj_in.weight.dtype == dtype:
        return block
    reduced = copy.deepcopy(block).to(dtype)
    for m in reduced.modules():
        if isinstance(m, nn.LayerNorm):
            m.float()
    return reduced


def attend(q, k, v, mask, scale):
    """Attention over keys allowed by `mask` (bool, broadcast to the scores); softmax in float32."""
    if q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = ((q * scale) @ k.transpose(-1, -2)).float()  # (R, H, n, keys); scaled first: fp16 range
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).type(q.dtype) @ v


class MaskedAttention:
    """A layer's attention over the call's own tokens, as `mask` (n, n) allows (no cache)."""

    def __init__(self, mask):
        self.mask = mask

    def __call__(self, q, k, v, scale):
        return attend(q, k, v, self.mask, scale)


class ScatteredCache:
    """A layer's attention over fixed-size caches (R, H, T, hd): the call's keys/values scattered in at their
    positions (`index`, (R, H, n, hd)), out of place, the queries seeing the keys `mask` (n, T) allows. The
    whole caches with the window written in are kept in `present` (graph outputs)."""

    def __init__(self, past, index, mask, dtype):
        self.past, self.index, self.mask, self.dtype = past, index, mask, dtype
        self.present: list = []

    def __call__(self, q, k, v, scale):
        past_k, past_v = self.past
        k_all = past_k.to(self.dtype).scatter(2, self.index, k)
        v_all = past_v.to(self.dtype).scatter(2, self.index, v)
        self.present = [k_all.float(), v_all.float()]
        return attend(q, k_all, v_all, self.mask, scale)


class PastAndSelf:
    """A single token's attention over a read-only fixed-size cache (R, H, T, hd) holding the positions
    `before` it (bool, (1, 1, 1, T)), plus its own key/value: nothing is written, the token's key/value are
    kept in `new` for the host to write in place (no O(T) cache copy per step)."""

    def __init__(self, past, before, dtype):
        self.past, self.before, self.dtype = past, before, dtype
        self.new: list = []

    def __call__(self, q, k, v, scale):
        past_k, past_v = (c.to(self.dtype) for c in self.past)
        T = past_k.shape[2]
        q = q * scale  # before the products: scores stay in fp16's range
        s_past = (q @ past_k.transpose(-1, -2)).float().masked_fill(~self.before, float("-inf"))  # (R, H, 1, T)
        s_self = (q * k).sum(-1, keepdim=True).float()  # (R, H, 1, 1)
        w = torch.softmax(torch.cat([s_past, s_self], dim=-1), dim=-1).type(q.dtype)
        self.new = [k.float(), v.float()]
        return w[..., :T] @ past_v + w[..., T:] * v


class BlockGraph(nn.Module):
    """One block in its own token order, with the pieces every variant shares. The layers are the block's
    own (`run_layer`, sejd/model/block.py); what differs between variants is how attention meets the cache."""

    def __init__(self, block: MetaBlock, num_tokens: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        block = reduced_block(block, dtype)
        self.block, self.spec, self.T, self.dtype = block, block.spec, num_tokens, dtype
        self.H, self.hd = block.spec.heads, block.spec.head_dim
        self.register_buffer("pos", block.permute(block.pos_embed.detach(), dim=0).clone())  # (T, C)

    def class_term(self, labels):
        return None if labels is None else self.block.class_term(labels)

    def embed(self, x, positions, labels, temps):
        """Tokens x (B, n, D) at `positions` (n,) -> rows (R, n, C) entering the first layer."""
        h = self.block.proj_in(rows(x, temps.shape[0]).to(self.dtype)) + self.pos.index_select(0, positions)
        ct = self.class_term(labels)
        return h if ct is None else h + ct

    def output(self, h, w, batch):
        """The last layer's rows (R, n, C) -> guided (xa, xb) (B, n, D) in float32; w (2, n) guidance weights."""
        xa, xb = split(self.spec, self.block.proj_out(h))
        return guide(xa, xb, w, batch)

    def parallel(self, x, labels, temps, guidance):
        """Full causal pass without cache over x (B, n, D) at positions [0, n) -> guided (xa, xb)."""
        n = x.shape[1]
        positions = torch.arange(n, device=x.device)
        h = self.embed(x, positions, labels, temps)
        causal = MaskedAttention(positions.view(1, -1) <= positions.view(-1, 1))  # (n, n): keys at or before
        for layer in self.block.attn_blocks:
            h = run_layer(self.spec, layer, h, causal, temps)
        return self.output(h, guidance[:, :n], x.shape[0])

    def unpack(self, rest):
        """Graph inputs after (x, pos): the caches per layer, then (labels,) temps, guidance."""
        L = self.spec.layers
        pasts = [(rest[2 * i], rest[2 * i + 1]) for i in range(L)]
        return (pasts, *_split_cond(self.has_classes, rest[2 * L:]))

    def cached(self, x, start, pasts, labels, temps, guidance):
        """Window x (B, n, D) at positions start + [0, n) over fixed-size caches (R, H, T, hd).

        Returns guided (xa, xb) and the caches with the window's keys/values written in.
        """
        B, n, _ = x.shape
        positions = start + torch.arange(n, device=x.device)  # (n,)
        h = self.embed(x, positions, labels, temps)
        R = h.shape[0]
        mask = torch.arange(self.T, device=x.device).view(1, -1) <= positions.view(-1, 1)  # (n, T): keys at or before the query
        index = positions.view(1, 1, n, 1).expand(R, self.H, n, self.hd)
        presents = []
        for layer, past in zip(self.block.attn_blocks, pasts):
            cache = ScatteredCache(past, index, mask, self.dtype)
            h = run_layer(self.spec, layer, h, cache, temps)
            presents += cache.present
        return (*self.output(h, guidance.index_select(1, positions), B), *presents)


class StepRowsGraph(BlockGraph):
    """One token over a read-only fixed-size cache: returns only this token's keys/values, which the
    host writes into its cache in place. No O(T) cache copy per step (what `step_present` must do when
    the runtime cannot update an input buffer in place, e.g. ONNX Runtime on the CPU)."""

    def __init__(self, block, num_tokens, has_classes, dtype=torch.float32):
        super().__init__(block, num_tokens, dtype)
        self.has_classes = has_classes

    def forward(self, x, pos, *rest):
        pasts, labels, temps, guidance = self.unpack(rest)
        h = self.embed(x, pos.view(1), labels, temps)
        before = (torch.arange(self.T, device=x.device) < pos).view(1, 1, 1, -1)  # cached keys strictly before this token
        news = []
        for layer, past in zip(self.block.attn_blocks, pasts):
            cache = PastAndSelf(past, before, self.dtype)
            h = run_layer(self.spec, layer, h, cache, temps)
            news += cache.new
        return (*self.output(h, guidance.index_select(1, pos.view(1)), x.shape[0]), *news)


def _split_cond(has_classes, args):
    """Graph inputs after the variant's own: (labels,) temps, guidance."""
    return (args[0], args[1], args[2]) if has_classes else (None, args[0], args[1])


class StepPresentGraph(BlockGraph):
    """x (B, 1, D), pos () int64, past caches -> xa, xb (B, 1, D), present caches."""

    def __init__(self, block, num_tokens, has_classes, dtype=torch.float32):
        super().__init__(block, num_tokens, dtype)
        self.has_classes = has_classes

    def forward(self, x, pos, *rest):
        return self.cached(x, pos, *self.unpack(rest))



class JacobiGraph(BlockGraph):
    """z, x (B, T, D) -> x_next (one parallel Jacobi iteration), residual (B,) = max |x_next - x|."""

    def __init__(self, block, num_tokens, has_classes, iterations: int = 1, dtype=torch.float32):
        super().__init__(block, num_tokens, dtype)
        self.has_classes, self.iterations = has_classes, iterations

    def iterate(self, z, x, labels, temps, guidance):
        inp = torch.cat([z[:, :1], x[:, 1:-1]], dim=1)  # token 0 is z_0 by definition, whatever x holds
        xa, xb = self.parallel(inp, labels, temps, guidance)  # params for tokens 1..T-1
        new = affine(z[:, 1:], xa, xb)
        x_next = torch.cat([z[:, :1], new], dim=1)
        return x_next, (new - x[:, 1:]).abs().amax(dim=(1, 2))  # token 0 is z_0, not an unknown

    def forward(self, z, x, *rest):
        labels, temps, guidance = _split_cond(self.has_classes, rest)
        if self.iterations == 1:
            return self.iterate(z, x, labels, temps, guidance)
        residuals = []
        for _ in range(self.iterations):  # unrolled: static, CUDA-graph friendly
            x, res = self.iterate(z, x, labels, temps, guidance)
            residuals.append(res)
        return x, res, torch.stack(residuals)  # residuals (K, B)


class SequentialBody(BlockGraph):
    """Loop body of `sequential_loop`: at iteration i, decode token i+1 of x from token i (KV-cached)."""

    def __init__(self, block, num_tokens, has_classes, dtype=torch.float32):
        super().__init__(block, num_tokens, dtype)
        self.has_classes = has_classes

    def forward(self, i, z, x, *rest):
        pasts, labels, temps, guidance = self.unpack(rest)
        x_tok = x.index_select(1, i.view(1))  # (B, 1, D)
        xa, xb, *presents = self.cached(x_tok, i, pasts, labels, temps, guidance)
        nxt = (i + 1).view(1)
        new = affine(z.index_select(1, nxt), xa, xb)
        x_next = x.scatter(1, nxt.view(1, 1, 1).expand(x.shape[0], 1, x.shape[2]), new)
        return (x_next, *presents)


def graph_module(model: TarFlow, k: int, variant: str, unroll: int = 1, dtype=torch.float32) -> BlockGraph:
    """The module computing one single-call block variant (step_present, step_rows, window, jacobi, jacobi_k)."""
    block, T, classes = model.blocks[k], model.config.num_tokens, bool(model.config.num_classes)
    if variant in ("step_present", "window"):
        return StepPresentGraph(block, T, classes, dtype=dtype).eval()
    if variant == "step_rows":
        return StepRowsGraph(block, T, classes, dtype=dtype).eval()
    if variant in ("jacobi", "jacobi_k"):
        return JacobiGraph(block, T, classes, iterations=unroll if variant == "jacobi_k" else 1, dtype=dtype).eval()
    raise ValueError(f"{variant} is not a single-call block variant")


class BlockForwardGraph(BlockGraph):
    """One block's forward (likelihood) pass in its own token order: x (B, T, D) (+ labels (B,)) ->
    z (B, T, D), logdet (B,). The whole-model `forward` graph is composed from these (see loops.py):
    the permutation lives in the position table, so every block's body has one topology and blocks
    2.. are re-targeted from block 0's, like the other variants. Always float32 (forward is)."""

    def forward(self, x, labels=None):
        block = self.block
        h = block.proj_in(x) + self.pos
        ct = self.class_term(labels)  # labels are given exactly when the model has classes
        h = h if ct is None else h + ct
        causal = cached_attention(None, 0, block.attention_mask(0, self.T))
        for layer in block.attn_blocks:  # the model's own attention, temperature 1
            h = run_layer(self.spec, layer, h, causal)
        xa, xb = split(self.spec, block.proj_out(h))
        # shift right by one token: token l is parameterised by tokens < l, token 0 by nothing
        xa = torch.cat([torch.zeros_like(xa[:, :1]), xa[:, :-1]], dim=1)
        xb = torch.cat([torch.zeros_like(xb[:, :1]), xb[:, :-1]], dim=1)
        return (x - xb) * (-xa).exp(), -xa.mean(dim=[1, 2])
