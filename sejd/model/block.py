"""One TarFlow flow block, described once: the program every attention layer runs, the weights it holds
(ml-tarflow's names and shapes), and how the block's output becomes guided affine parameters.

Everything that runs a block is derived from this file:
- the PyTorch model (`sejd/model/tarflow.py`): `MetaBlock` builds its modules from `BlockSpec.layer` and runs
  them with `run_layer`;
- every exported graph module and the torch-cuda modules (`sejd/export/graphs.py`): the same `run_layer`,
  with the KV cache handled the way each graph needs (the `attention` argument);
- ort-cpu's fused step graph (`sejd/engines/ort_fused_step.py`): ONNX nodes for each declared op;
- the native C step's packing (`sejd/engines/native.py`): the declared weights in the declared order, or the
  reason step.c cannot run the declared program.
`sejd/runtime/mltarflow_loop.py` is deliberately not derived from it: it is an independent statement of
ml-tarflow's own loop, one of the oracles the rest is checked against.

A layer is a program over the residual stream h (R rows, n tokens, C channels), each op reading the
previous op's output, or h after an op that adds into it (`residual`):

    layer_norm  attention.norm                     (R, n, C), computed in float32
    linear      attention.qkv   (3C, C)            (R, n, 3C): [q heads | k heads | v heads]
    attention                                      (R, n, C): softmax(q.k * head_dim**-0.5 / temp) v, over the
                                                   KV cache with this call's keys/values at their positions
    linear      attention.proj  (C, C)   residual  h = h + proj(.)
    layer_norm  mlp.norm
    linear      mlp.main.0      (E, C)             E: the MLP width (ml-tarflow: expansion x C)
    gelu        mlp.main.1                         erf GELU
    linear      mlp.main.2      (C, E)   residual  h = h + .

Around the layers: h = proj_in(x) + pos_embed[position] (+ the class term), and after them proj_out(h) ->
(xa, xb), the affine parameters of the next token (xa = 0 in a volume-preserving block). Rows: with
classifier-free guidance a batch of B samples runs as R = 2B rows, conditional rows first, row r taking
sample r mod B; the guided parameters are c + w (c - u).

STARFlow (apple/ml-starflow) blocks are the same layers with other options, declared by BlockSpec fields
whose defaults are TarFlow's (so a TarFlow spec computes bit for bit what it did before they existed):
`positions` "rope" (rotary angles per cache slot instead of a learned pos_embed), `start_token` (a learned
sos_embed as the block's first input), `final_norm` (RMSNorm before proj_out), `soft_clip`, `affine_scale`
"softplus" (sigma = softplus(a + log(e-1)), carried as xa = log sigma), `text_width`/`text_length` (a text
prefix through proj_txt, held in the KV cache's first slots) and `guidance` "starflow" (FACTS section 6).

Changing the block is editing this declaration. A block without biases or with another MLP width is a
config change (`bias`, `expansion`) that reaches every consumer through it (the native packing passes zeros
for an absent bias). Another kind of layer is a change of `BlockSpec.layer`, and a new op kind also needs its
PyTorch form in `run_layer` (every PyTorch and exported path follows); the fused step graph and the native
step refuse an op they lack, saying why, and the runners then keep the exported step graphs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, as ml-tarflow uses it
RMS_NORM_EPS = 1e-6  # ml-starflow's RMSNorm (final_norm)
OP_KINDS = ("layer_norm", "linear", "gelu", "attention")
POSITIONS = ("learned", "rope")
AFFINE_SCALES = ("exp", "softplus")
GUIDANCES = ("tarflow", "starflow")
INV_SOFTPLUS_1 = math.log(math.e - 1)  # softplus(0 + this) == 1: a zero proj_out is the identity flow
ROPE_THETA = 10000.0
ROPE_TEXT_PAIRS = 8  # ml-starflow's 3-D rope keeps 8 rotary pairs for the text axis (dim_split [.., 8])


@dataclasses.dataclass(frozen=True)
class Op:
    """One step of a layer's program."""

    kind: str  # one of OP_KINDS
    name: str = ""  # the module's path inside the layer (its state-dict key prefix); "" for the attention
    shape: tuple[int, ...] = ()  # its weight: (out, in) for a linear, (C,) for a layer norm
    bias: bool = False  # whether the linear has a bias, the layer norm a shift
    residual: bool = False  # the output is added into h, and the next op reads h
    eps: float = LAYER_NORM_EPS  # layer norms only

    def weights(self) -> dict[str, tuple[int, ...]]:
        """The op's tensors by key (relative to the layer) -> shape."""
        if not self.shape:
            return {}
        out = {f"{self.name}.weight": self.shape}
        if self.bias:
            out[f"{self.name}.bias"] = self.shape[:1]
        return out


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """The sizes and options of one flow block; `layer` and `weights` declare what it computes and holds."""

    num_tokens: int  # T
    token_dim: int  # D = in_channels * patch_size**2
    channels: int  # C, the model width
    head_dim: int
    layers: int  # L attention layers
    mlp_width: int  # E
    nvp: bool  # affine (xa, xb) when true, volume-preserving (xb only) when false
    num_classes: int  # 0: unconditional, no class embedding
    bias: bool = True  # every linear has a bias and every layer norm a shift (ml-tarflow's blocks do)
    # ---- STARFlow options; the defaults are TarFlow's
    positions: str = "learned"  # "learned": pos_embed (T, C) added after proj_in; "rope": rotary q/k per slot
    start_token: bool = False  # a learned sos_embed (1, 1, D) is the block's first input (token 0 at runtime)
    final_norm: bool = False  # RMSNorm (weight an offset from 1, eps 1e-6, float32) before proj_out
    soft_clip: float | None = None  # proj_out's output -> c * tanh(out / c)
    affine_scale: str = "exp"  # sigma = exp(a) (TarFlow) or softplus(a + log(e-1)) (STARFlow)
    text_width: int = 0  # Dt: proj_txt (C, Dt) and a text prefix (only the block that has text)
    text_length: int = 0  # Lt: the text prefix's length, the KV cache's first Lt slots (text blocks only)
    guidance: str = "tarflow"  # "tarflow": c + w (c - u); "starflow": ml-starflow's Gaussian formula
    grid: tuple[int, int] = (0, 0)  # rope: the (rows, columns) of the token grid, raster order
    rope_len: int = 0  # rope: pt_seq_len, the grid steps are scaled by rope_len / sqrt(rows * columns)
    rope_text_axis: bool = False  # rope: 3-D angles (row, column, text) as ml-starflow with txt_size > 0

    def __post_init__(self):
        # these are declarations, not user input (StarFlowConfig validates that): a wrong one is a bug
        assert self.positions in POSITIONS and self.affine_scale in AFFINE_SCALES and self.guidance in GUIDANCES
        if self.positions == "rope":
            assert self.grid[0] * self.grid[1] == self.num_tokens and self.rope_len > 0
            assert self.head_dim % 4 == 0 and (not self.rope_text_axis or self.head_dim // 2 > ROPE_TEXT_PAIRS)
        assert (self.text_width > 0) == (self.text_length > 0)

    @classmethod
    def from_config(cls, cfg) -> "BlockSpec":
        """From a TarFlowConfig (every block of a model has the same spec)."""
        return cls(cfg.num_tokens, cfg.token_dim, cfg.channels, cfg.head_dim, cfg.layers_per_block,
                   cfg.expansion * cfg.channels, cfg.nvp, cfg.num_classes, cfg.bias)

    @property
    def heads(self) -> int:  # H
        return self.channels // self.head_dim

    @property
    def out_dim(self) -> int:  # P, proj_out's width: xa and xb, or xb alone
        return 2 * self.token_dim if self.nvp else self.token_dim

    @property
    def scale(self) -> float:
        """The attention's score scale at temperature 1."""
        return self.head_dim**-0.5

    @functools.cached_property  # read for every layer of every call: made once
    def layer(self) -> tuple[Op, ...]:
        """The program of every attention layer (see the module docstring)."""
        C, E, b = self.channels, self.mlp_width, self.bias
        return (
            Op("layer_norm", "attention.norm", (C,), b),
            Op("linear", "attention.qkv", (3 * C, C), b),
            Op("attention"),
            Op("linear", "attention.proj", (C, C), b, residual=True),
            Op("layer_norm", "mlp.norm", (C,), b),
            Op("linear", "mlp.main.0", (E, C), b),
            Op("gelu", "mlp.main.1"),
            Op("linear", "mlp.main.2", (C, E), b, residual=True),
        )

    @property
    def proj_in(self) -> Op:
        return Op("linear", "proj_in", (self.channels, self.token_dim), self.bias)

    @property
    def proj_out(self) -> Op:
        return Op("linear", "proj_out", (self.out_dim, self.channels), self.bias)

    @property
    def proj_txt(self) -> Op:  # text blocks only
        return Op("linear", "proj_txt", (self.channels, self.text_width), self.bias)

    @property
    def final_norm_op(self) -> Op:  # final_norm blocks only
        return Op("rms_norm", "final_norm", (self.channels,), eps=RMS_NORM_EPS)

    @property
    def run_tokens(self) -> int:
        """Tokens the runtime decodes: T, or T + 1 with a start token (token 0 is the start token, given, like
        a TarFlow block's token 0 = z_0; the output at position i parameterises token i + 1 either way)."""
        return self.num_tokens + int(self.start_token)

    @property
    def cache_slots(self) -> int:
        """KV-cache length: the text prefix's slots, then one per runtime position."""
        return self.text_length + self.run_tokens

    def parameters(self) -> dict[str, tuple[int, ...]]:
        """Every learned tensor of one block by state-dict key (ml-tarflow's / ml-starflow's names) -> shape."""
        T, C = self.num_tokens, self.channels
        out = dict(self.proj_in.weights())
        if self.positions == "learned":
            out["pos_embed"] = (T, C)
        if self.num_classes:  # ml-tarflow has no class_embed key at all in unconditional models
            out["class_embed"] = (self.num_classes, 1, C)
        if self.start_token:
            out["sos_embed"] = (1, 1, self.token_dim)
        if self.text_width:
            out.update(self.proj_txt.weights())
        for j in range(self.layers):
            for op in self.layer:
                out.update({f"attn_blocks.{j}.{k}": s for k, s in op.weights().items()})
        if self.final_norm:
            out.update(self.final_norm_op.weights())
        out.update(self.proj_out.weights())
        return out

    def num_parameters(self) -> int:
        """Learned parameters of one block, counted from the declaration (no tensor is made)."""
        return sum(math.prod(s) for s in self.parameters().values())

    def buffers(self) -> dict[str, tuple[int, ...]]:
        if self.positions == "rope":  # ml-starflow's attn_mask is deprecated and never read: sejd holds none
            return {}
        return {"attn_mask": (self.num_tokens, self.num_tokens)}  # ml-tarflow's causal mask, kept for its key

    def rope_angles(self) -> torch.Tensor:
        """(cache_slots, head_dim) float64 rotation angles, one row per KV-cache slot (ml-starflow's
        VisionRotaryEmbeddingFast + get_positions): text slot i < Lt at (0, 0, i / Lt * rope_len), runtime
        position j at grid slot (j // W, j % W), each scaled by rope_len / sqrt(H * W). Angles belong to
        sequence slots, not to the token sitting there: a flipped block's slot j is still rotated by (j // W,
        j % W), and with a start token runtime position 0 (the start token) is grid slot (0, 0) (FACTS 4).
        The row after the last grid slot (runtime position T, never projected) continues the raster.
        Spatial pairs: half - 8 with a text axis (else half), split over rows and columns with frequencies
        theta^(-2k / spatial); text axis: 8 pairs with theta^(-k / 8) (k/8, not 2k/8, as ml-starflow)."""
        H, W = self.grid
        half, Lt = self.head_dim // 2, self.text_length
        spatial = half - ROPE_TEXT_PAIRS if self.rope_text_axis else half
        f = ROPE_THETA ** (-torch.arange(0, spatial, 2, dtype=torch.float64) / spatial)
        j = torch.arange(self.run_tokens, dtype=torch.float64)
        unit = self.rope_len / math.sqrt(H * W)
        row, col = torch.div(j, W, rounding_mode="floor") * unit, torch.remainder(j, W) * unit
        zeros = torch.zeros(Lt, dtype=torch.float64)
        ang = [torch.cat([zeros, row])[:, None] * f, torch.cat([zeros, col])[:, None] * f]
        if self.rope_text_axis:
            f2 = ROPE_THETA ** (-torch.arange(ROPE_TEXT_PAIRS, dtype=torch.float64) / ROPE_TEXT_PAIRS)
            t = torch.cat([torch.arange(Lt, dtype=torch.float64) / max(Lt, 1) * self.rope_len,
                           torch.zeros(self.run_tokens, dtype=torch.float64)])
            ang.append(t[:, None] * f2)
        return torch.cat(ang, -1).repeat_interleave(2, -1)  # each angle drives an adjacent (even, odd) pair


# ---------------------------------------------------------------- PyTorch, derived from the declaration


def make_module(op: Op) -> nn.Module:
    """The PyTorch module of a declared op (its parameters are the op's declared weights)."""
    if op.kind == "layer_norm":
        return nn.LayerNorm(op.shape[0], eps=op.eps, bias=op.bias)
    if op.kind == "linear":
        return nn.Linear(op.shape[1], op.shape[0], bias=op.bias)
    if op.kind == "gelu":
        return nn.GELU()
    if op.kind == "rms_norm":
        return RMSNorm(op.shape[0], op.eps)
    raise ValueError(f"op {op.kind!r} has no module")


class RMSNorm(nn.Module):
    """ml-starflow's RMSNorm: x * rsqrt(mean(x^2) + eps) * (1 + weight) in float32; the weight is an offset
    from 1 (zeros at initialisation, add_unit_offset)."""

    def __init__(self, dim: int, eps: float = RMS_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight.float())
        return y.type(x.dtype)


class Layer(nn.Module):
    """One attention layer's modules, each at its declared path (containers made on the way, numbered ones
    as nn.Sequential like ml-tarflow's `mlp.main`), so state-dict keys are ml-tarflow's."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        for op in spec.layer:
            if not op.name:
                continue
            *path, leaf = op.name.split(".")
            node = self
            for i, part in enumerate(path):
                if part not in node._modules:
                    numbered = (path + [leaf])[i + 1].isdigit()
                    node.add_module(part, nn.Sequential() if numbered else nn.Module())
                node = node._modules[part]
            node.add_module(leaf, make_module(op))
        # run_layer's lookups by declared name, resolved once (a plain dict: the modules stay registered at
        # their paths only)
        self.op_modules = {op.name: self.get_submodule(op.name) for op in spec.layer if op.name}


def run_layer(spec: BlockSpec, layer: Layer, h: torch.Tensor, attention, temp=1.0) -> torch.Tensor:
    """One layer of the block over the residual stream h (R, n, C) -> (R, n, C), in h's dtype.

    attention(q, k, v, scale) -> (R, H, n, hd): q, k, v (R, H, n, hd) are this call's tokens, q already
    divided by the row's temperature when `temp` is a (R,) tensor (a float temperature is folded into
    `scale` instead); the callable owns the KV cache: where this call's keys/values are written and which
    positions the queries see.
    """
    x = h
    for op in spec.layer:
        if op.kind == "layer_norm":  # in float32 (a reduced-precision block keeps its norms in float32)
            x = layer.op_modules[op.name](x.float()).type(h.dtype)
        elif op.kind in ("linear", "gelu"):
            x = layer.op_modules[op.name](x)
        elif op.kind == "attention":
            R, n, _ = x.shape
            # (R, n, 3C) -> (R, 3H, n, hd) -> 3 x (R, H, n, hd)
            q, k, v = x.reshape(R, n, 3 * spec.heads, spec.head_dim).transpose(1, 2).chunk(3, dim=1)
            scale = spec.scale
            if torch.is_tensor(temp):
                q = q / temp.view(-1, 1, 1, 1).to(q.dtype)
            else:
                scale = scale / temp
            x = attention(q, k, v, scale).transpose(1, 2).reshape(R, n, spec.channels)  # heads side by side
        else:
            raise ValueError(f"unknown op kind {op.kind!r}; expected one of {OP_KINDS}")
        if op.residual:
            h = x = h + x
    return h


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., n, hd) by per-token angles (cos, sin of (n, hd)) in interleaved pairs (2m, 2m+1), as
    ml-starflow's rotate_half: out[2m] = x[2m] cos - x[2m+1] sin, out[2m+1] = x[2m+1] cos + x[2m] sin."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return x * cos + torch.stack([-x2, x1], -1).flatten(-2) * sin


def cached_attention(cache, start: int, mask, rope=None):
    """The attention of `run_layer` over a static, preallocated KV cache (key, value) of (R, H, T, hd)
    holding positions < start: the call's keys/values are written in place at [start, start + n) and the
    queries attend over [0, start + n) as `mask` allows (bool, True = attend; None = all). Without a cache,
    over the call's own tokens. `rope` (cos, sin), each (n, hd): the rotary angles of the call's own slots;
    q and k are rotated before k is written, so the cache holds rotated keys (each slot keeps its own angle;
    ml-starflow rotates its unrotated cache at every read with the same per-slot angles: the same maths)."""
    def attend(q, k, v, scale):
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            n = q.shape[2]
            k_cache, v_cache = cache
            k_cache[:, :, start:start + n] = k
            v_cache[:, :, start:start + n] = v
            k, v = k_cache[:, :, :start + n], v_cache[:, :, :start + n]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return attend


def split(spec: BlockSpec, p: torch.Tensor):
    """proj_out's output (..., P) -> the affine parameters (xa, xb) of x = z exp(xa) + xb; xa is zero in a
    volume-preserving block. STARFlow: soft clip c tanh(p / c) on both halves first; with a softplus scale,
    sigma = softplus(a + log(e-1)) in float32 and xa = log sigma (so exp(xa) gives sigma back; the first D
    channels drive the scale, the last D the shift, as in ml-starflow)."""
    if spec.soft_clip:
        p = spec.soft_clip * torch.tanh(p / spec.soft_clip)
    if not spec.nvp:
        return torch.zeros_like(p), p
    xa, xb = p.chunk(2, dim=-1)
    if spec.affine_scale == "softplus":
        xa = F.softplus(xa.float() + INV_SOFTPLUS_1).log().type(xa.dtype)
    return xa, xb


def rows(x: torch.Tensor, R: int) -> torch.Tensor:
    """(B, n, D) samples -> (R, n, D) rows, row r being sample r mod B (R = B, or 2B with guidance: the
    conditional rows, then the unconditional ones). Index arithmetic, so one exported graph takes both."""
    idx = torch.arange(R, device=x.device) % x.shape[0]
    return x.index_select(0, idx)


def guide(xa, xb, w, batch: int, kind: str = "tarflow"):
    """The rows' parameters (R, n, D) -> the B samples' guided (xa, xb) (B, n, D), in float32. c are the
    conditional rows, u the unconditional ones, w (2, n) the weights of xa and xb at each position (None: no
    guidance). With R == B, c and u are the same rows and the result is c.

    kind "tarflow": c + w (c - u) on xa and xb separately.
    kind "starflow" (ml-starflow's MetaBlock.guidance, from (1+w) log p_c - w log p_u of two Gaussians;
    w = w[0]): with sigma = exp(xa), mu = xb, s = min(sigma_c / sigma_u, 1)^2, den = 1 + w - w s:
    sigma = sigma_c / sqrt(den), mu = ((1 + w) mu_c - w s mu_u) / den. The ratio is taken in the log domain
    (s = exp(2 min(xa_c - xa_u, 0))), and xa = xa_c - log(den) / 2."""
    xa, xb = xa.float(), xb.float()
    R = xa.shape[0]
    ca, cb = xa[:batch], xb[:batch]
    if w is None:
        return ca, cb
    ua, ub = xa[R - batch:], xb[R - batch:]
    if kind == "starflow":
        g = w[0].view(-1, 1)
        s = torch.exp(2 * (ca - ua).clamp(max=0.0))
        den = 1 + g - g * s
        return ca - 0.5 * den.log(), ((1 + g) * cb - g * s * ub) / den
    return ca + w[0].view(-1, 1) * (ca - ua), cb + w[1].view(-1, 1) * (cb - ub)


def affine(z, xa, xb):
    """x = z exp(xa) + xb: one token of the block's inverse, from its noise z and its parameters (exp in
    float32)."""
    return z * xa.float().exp().type(xa.dtype) + xb
