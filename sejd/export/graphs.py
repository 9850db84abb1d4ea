"""Export-friendly PyTorch modules, one per graph variant, built on the reference model's blocks.

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

from sejd.model.tarflow import MetaBlock, TarFlow


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(precision: str) -> torch.dtype:
    from sejd.errors import SejdError

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


class BlockGraph(nn.Module):
    """One block in its own token order, with the pieces every variant shares."""

    def __init__(self, block: MetaBlock, num_tokens: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        block = reduced_block(block, dtype)
        self.block, self.T, self.dtype = block, num_tokens, dtype
        attn = block.attn_blocks[0].attention
        self.H, self.hd = attn.num_heads, block.pos_embed.shape[1] // attn.num_heads
        self.register_buffer("pos", block.permute(block.pos_embed.detach(), dim=0).clone())  # (T, C)

    def rows(self, x, temps):
        """(B, n, D) -> (R, n, D): row r is sample r mod B."""
        idx = torch.arange(temps.shape[0], device=x.device) % x.shape[0]
        return x.index_select(0, idx)

    def class_term(self, labels):
        return None if labels is None else self.block.class_term(labels)

    def guide(self, xa, xb, w, batch):
        """(R, n, D) params -> guided (B, n, D) in float32: c + w*(c - u). With R == B, c and u are the
        same rows."""
        xa, xb = xa.float(), xb.float()
        R = xa.shape[0]
        ca, ua, cb, ub = xa[:batch], xa[R - batch:], xb[:batch], xb[R - batch:]
        return ca + w[0].view(-1, 1) * (ca - ua), cb + w[1].view(-1, 1) * (cb - ub)

    def parallel(self, x, labels, temps, guidance):
        """Full causal pass without cache over x (B, n, D) at positions [0, n) -> guided (xa, xb)."""
        n = x.shape[1]
        positions = torch.arange(n, device=x.device)
        h = self.embed(x, positions, labels, temps)
        mask = positions.view(1, -1) <= positions.view(-1, 1)  # (n, n): keys at or before the query
        for layer in self.block.attn_blocks:
            q, k, v = self.qkv(layer.attention, h, temps)
            h = self.attention_out(layer, h, attend(q, k, v, mask, layer.attention.scale))
        xa, xb = self.block.split(self.block.proj_out(h))
        return self.guide(xa, xb, guidance[:, :n], x.shape[0])

    def qkv(self, attn, h, temps):
        """(R, n, C) -> q, k, v (R, H, n, hd), q divided by the row's attention temperature."""
        R, n, _ = h.shape
        a = attn.norm(h.float()).type(h.dtype)
        # (R, n, 3C) -> (R, 3H, n, hd) -> 3 x (R, H, n, hd)
        q, k, v = attn.qkv(a).reshape(R, n, 3 * self.H, self.hd).transpose(1, 2).chunk(3, dim=1)
        return q / temps.view(-1, 1, 1, 1).to(q.dtype), k, v

    def attention_out(self, layer, h, out):
        """Residual attention output (R, H, n, hd) and the MLP on top."""
        R, n, _ = h.shape
        h = h + layer.attention.proj(out.transpose(1, 2).reshape(R, n, -1))
        return h + layer.mlp(h)

    def embed(self, x, positions, labels, temps):
        """Tokens x (B, n, D) at `positions` (n,) -> rows (R, n, C) entering the first layer."""
        h = self.block.proj_in(self.rows(x, temps).to(self.dtype)) + self.pos.index_select(0, positions)
        ct = self.class_term(labels)
        return h if ct is None else h + ct

    def unpack(self, rest):
        """Graph inputs after (x, pos): the caches per layer, then (labels,) temps, guidance."""
        L = len(self.block.attn_blocks)
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
        for layer, (past_k, past_v) in zip(self.block.attn_blocks, pasts):
            q, k, v = self.qkv(layer.attention, h, temps)
            k_all, v_all = past_k.to(self.dtype).scatter(2, index, k), past_v.to(self.dtype).scatter(2, index, v)
            h = self.attention_out(layer, h, attend(q, k_all, v_all, mask, layer.attention.scale))
            presents += [k_all.float(), v_all.float()]
        xa, xb = self.block.split(self.block.proj_out(h))
        w = guidance.index_select(1, positions)
        return (*self.guide(xa, xb, w, B), *presents)


class StepRowsGraph(BlockGraph):
    """One token over a read-only fixed-size cache: returns only this token's keys/values, which the
    host writes into its cache in place. No O(T) cache copy per step (what `step_present` must do when
    the runtime cannot update an input buffer in place, e.g. ONNX Runtime on the CPU)."""

    def __init__(self, block, num_tokens, has_classes, dtype=torch.float32):
        super().__init__(block, num_tokens, dtype)
        self.has_classes = has_classes

    def forward(self, x, pos, *rest):
        pasts, labels, temps, guidance = self.unpack(rest)
        B = x.shape[0]
        h = self.embed(x, pos.view(1), labels, temps)
        before = (torch.arange(self.T, device=x.device) < pos).view(1, 1, 1, -1)  # cached keys strictly before this token
        news = []
        for layer, (past_k, past_v) in zip(self.block.attn_blocks, pasts):
            scale = layer.attention.scale
            past_k, past_v = past_k.to(self.dtype), past_v.to(self.dtype)
            q, k, v = self.qkv(layer.attention, h, temps)  # (R, H, 1, hd)
            q = q * scale  # before the products: scores stay in fp16's range
            s_past = (q @ past_k.transpose(-1, -2)).float().masked_fill(~before, float("-inf"))  # (R, H, 1, T)
            s_self = (q * k).sum(-1, keepdim=True).float()  # (R, H, 1, 1)
            w = torch.softmax(torch.cat([s_past, s_self], dim=-1), dim=-1).type(q.dtype)
            out = w[..., :self.T] @ past_v + w[..., self.T:] * v
            h = self.attention_out(layer, h, out)
            news += [k.float(), v.float()]
        xa, xb = self.block.split(self.block.proj_out(h))
        return (*self.guide(xa, xb, guidance.index_select(1, pos.view(1)), B), *news)


def _affine(z, xa, xb):
    return z * xa.float().exp().type(xa.dtype) + xb


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


WindowGraph = StepPresentGraph  # same computation; the window variant is exported with a dynamic token count


class JacobiGraph(BlockGraph):
    """z, x (B, T, D) -> x_next (one parallel Jacobi iteration), residual (B,) = max |x_next - x|."""

    def __init__(self, block, num_tokens, has_classes, iterations: int = 1, dtype=torch.float32):
        super().__init__(block, num_tokens, dtype)
        self.has_classes, self.iterations = has_classes, iterations

    def iterate(self, z, x, labels, temps, guidance):
        inp = torch.cat([z[:, :1], x[:, 1:-1]], dim=1)  # token 0 is z_0 by definition, whatever x holds
        xa, xb = self.parallel(inp, labels, temps, guidance)  # params for tokens 1..T-1
        new = _affine(z[:, 1:], xa, xb)
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
        new = _affine(z.index_select(1, nxt), xa, xb)
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
        mask = block.attention_mask(0, self.T)
        for layer in block.attn_blocks:  # the reference layers, temperature 1: the model's own maths
            h = layer(h, mask)
        xa, xb = block.split(block.proj_out(h))
        # shift right by one token: token l is parameterised by tokens < l, token 0 by nothing
        xa = torch.cat([torch.zeros_like(xa[:, :1]), xa[:, :-1]], dim=1)
        xb = torch.cat([torch.zeros_like(xb[:, :1]), xb[:, :-1]], dim=1)
        return (x - xb) * (-xa).exp(), -xa.mean(dim=[1, 2])
