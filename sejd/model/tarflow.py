"""TarFlow: a transformer autoregressive normalizing flow, as in Apple's ml-tarflow.

State-dict keys, shapes and numerics match ml-tarflow's `transformer_flow.Model`, so its
checkpoints load unchanged. What a flow block computes and holds is declared once in
`sejd/model/block.py`; the blocks here are built from that declaration. Differences are additive:
attention can read and write a static, preallocated KV cache at an explicit position (what the
runtime's block runners use), the class term accepts per-sample labels with -1 meaning
"unconditional" everywhere, and a block may go without biases (`bias=False`).

Shapes: B batch, T tokens, D token width (in_channels * patch**2), C model width.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from sejd.core.errors import ConfigError
from sejd.model.block import (
    BlockSpec,
    Layer,
    cached_attention,
    make_module,
    run_layer,
    split,
)

# Plausibility bounds, generous against the largest published TarFlow (ImageNet-128: T = 1024 tokens,
# 1024 channels, 8 blocks x 8 layers, 3.2 GB of float32 weights). They exist so that a typo or a hostile
# file (num_blocks 10**9, channels 2**40) fails at once instead of hanging or exhausting memory.
MAX_TOKENS = 16384  # 16x the published T; the causal mask alone is T^2 floats per block
MAX_LAYERS = 1024  # num_blocks * layers_per_block, 16x the published 8 x 8
MAX_WEIGHT_BYTES = 16 * 2**30  # float32 parameters and buffers, 5x ImageNet-128's 3.2 GB


@dataclasses.dataclass(frozen=True)
class TarFlowConfig:
    """Model hyper-parameters; field names are those of ml-tarflow's `Model` constructor, plus `bias`."""

    in_channels: int
    img_size: int
    patch_size: int
    channels: int
    num_blocks: int
    layers_per_block: int
    head_dim: int = 64
    expansion: int = 4
    nvp: bool = True
    num_classes: int = 0
    bias: bool = True  # not ml-tarflow's: False drops every linear's bias and every LayerNorm's shift

    def __post_init__(self):
        for name in ("in_channels", "img_size", "patch_size", "channels", "num_blocks",
                     "layers_per_block", "head_dim", "expansion"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"TarFlowConfig.{name} must be a positive int, got {value!r}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.channels % self.head_dim:
            raise ConfigError(f"channels {self.channels} is not a multiple of head_dim {self.head_dim}")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 0:
            raise ConfigError(f"num_classes must be an int >= 0, got {self.num_classes!r}")
        for name in ("nvp", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self._check_plausible()

    def _check_plausible(self) -> None:
        """Refuse geometry no TarFlow has, before anything is sized from it (pure integer arithmetic)."""
        if self.num_tokens > MAX_TOKENS:
            raise ConfigError(f"img_size {self.img_size} / patch_size {self.patch_size} gives {self.num_tokens} "
                              f"tokens; at most {MAX_TOKENS} are supported (published TarFlows use 1024)")
        layers = self.num_blocks * self.layers_per_block
        if layers > MAX_LAYERS:
            raise ConfigError(f"num_blocks {self.num_blocks} x layers_per_block {self.layers_per_block} = {layers} "
                              f"layers; at most {MAX_LAYERS} are supported (published TarFlows use 8 x 8)")
        if self.weight_bytes > MAX_WEIGHT_BYTES:
            raise ConfigError(f"this config needs {self.weight_bytes:.3g} bytes of float32 weights "
                              f"({self.num_parameters:.3g} parameters: channels {self.channels}, expansion "
                              f"{self.expansion}, token width {self.token_dim}, {self.num_classes} classes); at most "
                              f"{MAX_WEIGHT_BYTES // 2**30} GiB are supported (ImageNet-128's TarFlow has 3.2 GB)")

    @property
    def num_tokens(self) -> int:  # T
        return (self.img_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:  # D
        return self.in_channels * self.patch_size**2

    @property
    def num_heads(self) -> int:
        return self.channels // self.head_dim

    @property
    def block_spec(self) -> BlockSpec:
        """What each flow block computes and holds (sejd/model/block.py)."""
        return BlockSpec.from_config(self)

    @property
    def num_parameters(self) -> int:
        """Learned parameters of the whole flow, counted from the block declaration (no model is built)."""
        return self.num_blocks * self.block_spec.num_parameters()

    @property
    def weight_bytes(self) -> int:
        """float32 bytes of parameters and buffers (each block's T x T causal mask, the prior variance)."""
        buffers = self.num_blocks * self.num_tokens**2 + self.num_tokens * self.token_dim
        return 4 * (self.num_parameters + buffers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TarFlowConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown TarFlowConfig fields {sorted(unknown)}; expected a subset of {sorted(fields)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"incomplete TarFlowConfig {d}: {e}") from None


class MetaBlock(nn.Module):
    """One flow block. `flip` permutes the token axis (odd blocks); all maths runs in permuted order.

    `window` (None: the exact model) restricts every attention layer of the block to the last `window`
    positions, the query's own included: the output at position l, which parameterises token l+1,
    attends only to positions l-window+1 .. l (see `attention_mask`). It is read at every `project`
    call, so the KV-cached runners and the decoders built on them run the windowed block unchanged.
    """

    attn_mask: torch.Tensor
    window: int | None = None

    def __init__(self, cfg: TarFlowConfig, flip: bool):
        super().__init__()
        self.spec = spec = cfg.block_spec  # what the block computes and holds (sejd/model/block.py)
        T, C = spec.num_tokens, spec.channels
        self.flip = flip
        # modules in ml-tarflow's order: its state-dict keys, and the same random draws at initialisation
        self.proj_in = make_module(spec.proj_in)  # (B, n, D) -> (B, n, C)
        self.pos_embed = nn.Parameter(torch.randn(T, C) * 1e-2)
        # ml-tarflow registers class_embed as None for unconditional models: no key in the state dict.
        self.class_embed = nn.Parameter(torch.randn(spec.num_classes, 1, C) * 1e-2) if spec.num_classes else None
        self.attn_blocks = nn.ModuleList(Layer(spec) for _ in range(spec.layers))
        self.proj_out = make_module(spec.proj_out)  # (B, n, C) -> (B, n, 2D or D)
        self.proj_out.weight.data.fill_(0.0)  # every block starts as the identity map
        self.register_buffer("attn_mask", torch.tril(torch.ones(T, T)))

    def permute(self, x, dim=1):
        """The block's token permutation; it is its own inverse."""
        return x.flip(dims=[dim]) if self.flip else x

    def class_term(self, y):
        """(B,) int64 labels, -1 meaning unconditional, or None -> (B or 1, 1, C), or None without classes."""
        if self.class_embed is None:
            return None
        mean = self.class_embed.mean(dim=0)  # (1, C)
        if y is None:
            return mean[None]
        dropped = (y < 0).view(-1, 1, 1)
        return torch.where(dropped, mean, self.class_embed[y.clamp(min=0)])

    def split(self, p):
        """proj_out output (..., 2D or D) -> (xa, xb); xa is zero for volume-preserving blocks."""
        return split(self.spec, p)

    def project(self, x, start=0, class_term=None, cache=None, temp=1.0):
        """Raw affine parameters (xa, xb) at positions start..start+n-1, in permuted order.

        Output j is computed from tokens <= start+j and parameterises token start+j+1.
        """
        n = x.shape[1]
        h = self.proj_in(x) + self.permute(self.pos_embed, dim=0)[start:start + n]
        if class_term is not None:
            h = h + class_term
        mask = self.attention_mask(start, n)
        for layer, layer_cache in zip(self.attn_blocks, cache or [None] * len(self.attn_blocks)):
            h = run_layer(self.spec, layer, h, cached_attention(layer_cache, start, mask), temp)
        return self.split(self.proj_out(h))

    def attention_mask(self, start: int, n: int):
        """Which keys [0, start+n) the queries at positions [start, start+n) may attend to (bool, True =
        attend), or None when every key is allowed (one causal query over its own cached prefix)."""
        if self.window is None:
            return None if n == 1 else self.attn_mask[start:start + n, :start + n].bool()
        query = torch.arange(start, start + n, device=self.attn_mask.device)[:, None]
        key = torch.arange(start + n, device=self.attn_mask.device)[None]
        return (key <= query) & (key > query - self.window)

    def forward(self, x, y=None):
        """x (B, T, D) in image token order -> (z in image token order, logdet (B,))."""
        x = self.permute(x)
        xa, xb = self.project(x, 0, self.class_term(y))
        # shift right by one token: position l is parameterised by tokens < l, token 0 by nothing
        xa = torch.cat([torch.zeros_like(xa[:, :1]), xa[:, :-1]], dim=1)
        xb = torch.cat([torch.zeros_like(xb[:, :1]), xb[:, :-1]], dim=1)
        z = (x - xb) * (-xa.float()).exp().type(xa.dtype)
        return self.permute(z), -xa.mean(dim=[1, 2])


class TarFlow(nn.Module):
    """The whole flow: patchify, `num_blocks` MetaBlocks alternating identity/flip, a Gaussian prior."""

    var: torch.Tensor
    VAR_LR = 0.1

    def __init__(self, config: TarFlowConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(MetaBlock(config, flip=bool(i % 2)) for i in range(config.num_blocks))
        # prior variance per token and feature; ones for nvp models, learned by update_prior otherwise
        self.register_buffer("var", torch.ones(config.num_tokens, config.token_dim))

    def patchify(self, x):
        """(B, C, H, W) -> (B, T, C*p*p): channel-major inside a token, tokens in raster order."""
        p = self.config.patch_size
        return F.unfold(x, p, stride=p).transpose(1, 2)

    def unpatchify(self, x):
        """(B, T, C*p*p) -> (B, C, H, W)."""
        s, p = self.config.img_size, self.config.patch_size
        return F.fold(x.transpose(1, 2), (s, s), p, stride=p)

    def forward(self, x, y=None):
        """Image (B, C, H, W) -> (z (B, T, D), per-block outputs, summed logdet (B,)), as ml-tarflow."""
        x = self.patchify(x)
        outputs = []
        logdets = torch.zeros((), device=x.device)
        for block in self.blocks:
            x, logdet = block(x, y)
            logdets = logdets + logdet
            outputs.append(x)
        return x, outputs, logdets

    def get_loss(self, z, logdets):
        return 0.5 * z.pow(2).mean() - logdets.mean()

    def log_prob(self, x, y=None):
        """Per-sample log-likelihood up to a constant, in nats summed over pixels: -N * per-sample loss."""
        z, _, logdets = self(x, y)
        n = z[0].numel()
        return -n * (0.5 * z.pow(2).mean(dim=[1, 2]) - logdets)

    def bits_per_dim(self, x, y=None):
        """Negative log-likelihood in bits per dimension of data in [-1, 1] (Gaussian prior included)."""
        z, _, logdets = self(x, y)
        nll = 0.5 * z.pow(2).mean(dim=[1, 2]) + 0.5 * math.log(2 * math.pi) - logdets
        # data in [-1, 1] spans 2/256 per 8-bit level: add log(128) nats per dim for the 8-bit scale
        return (nll + math.log(128)) / math.log(2)

    @torch.no_grad()
    def update_prior(self, z):
        self.var.lerp_((z**2).mean(dim=0), weight=self.VAR_LR)
