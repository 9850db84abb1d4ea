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


class TokenGeometry:
    """What a config's fields say about its tokens (TarFlow's and STARFlow's configs alike)."""

    @property
    def num_tokens(self) -> int:  # T
        return (self.img_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:  # D
        return self.in_channels * self.patch_size**2

    @property
    def num_heads(self) -> int:
        return self.channels // self.head_dim


@dataclasses.dataclass(frozen=True)
class TarFlowConfig(TokenGeometry):
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
    """One flow block, built from its BlockSpec (a TarFlowConfig gives TarFlow's). `flip` permutes the token
    axis (odd TarFlow blocks); all maths runs in permuted order.

    `window` (None: the exact model) restricts every attention layer of the block to the last `window`
    positions, the query's own included: the output at position l, which parameterises token l+1,
    attends only to positions l-window+1 .. l (see `attention_mask`). It is read at every `project`
    call, so the KV-cached runners and the decoders built on them run the windowed block unchanged.

    A STARFlow block (spec.positions "rope", sejd/model/starflow.py) holds ml-starflow's modules instead of
    pos_embed: sos_embed, proj_txt (the text block), final_norm; its KV cache starts with the text prefix's
    slots (`prefix`), and the runtime sees it as spec.run_tokens = T + 1 tokens (`to_runner`).
    """

    attn_mask: torch.Tensor
    window: int | None = None

    def __init__(self, cfg: "TarFlowConfig | BlockSpec", flip: bool):
        super().__init__()
        # what the block computes and holds (sejd/model/block.py)
        self.spec = spec = cfg if isinstance(cfg, BlockSpec) else cfg.block_spec
        T, C = spec.num_tokens, spec.channels
        self.flip = flip
        # modules in ml-tarflow's order: its state-dict keys, and the same random draws at initialisation
        # (the STARFlow-only modules are made only when declared, after TarFlow's draws)
        self.proj_in = make_module(spec.proj_in)  # (B, n, D) -> (B, n, C)
        learned = spec.positions == "learned"
        self.pos_embed = nn.Parameter(torch.randn(T, C) * 1e-2) if learned else None
        # ml-tarflow registers class_embed as None for unconditional models: no key in the state dict.
        self.class_embed = nn.Parameter(torch.randn(spec.num_classes, 1, C) * 1e-2) if spec.num_classes else None
        if spec.start_token:
            self.sos_embed = nn.Parameter(torch.randn(1, 1, spec.token_dim))
        if spec.text_width:
            self.proj_txt = make_module(spec.proj_txt)
        self.attn_blocks = nn.ModuleList(Layer(spec) for _ in range(spec.layers))
        if spec.final_norm:
            self.final_norm = make_module(spec.final_norm_op)
        self.proj_out = make_module(spec.proj_out)  # (B, n, C) -> (B, n, 2D or D)
        self.proj_out.weight.data.fill_(0.0)  # every block starts as the identity map
        if learned:
            self.register_buffer("attn_mask", torch.tril(torch.ones(T, T)))
        self._rope: dict = {}  # (device, dtype) -> (cos, sin) per cache slot; made from the spec on first use

    def permute(self, x, dim=1):
        """The block's token permutation; it is its own inverse."""
        return x.flip(dims=[dim]) if self.flip else x

    def to_runner(self, z):
        """Block input (B, T, D) in permuted order -> the runtime's tokens (B, run_tokens, D): with a start
        token, token 0 is sos_embed (x_0 = z_0 = sos, given, like a TarFlow block's x_0 = z_0), so every
        decoder's "output i parameterises token i + 1" holds unchanged. Identity for TarFlow."""
        if not self.spec.start_token:
            return z
        # detached: the runtime decodes, it never trains
        return torch.cat([self.sos_embed.detach().to(z.dtype).expand(z.shape[0], 1, -1), z], dim=1)

    def from_runner(self, x):
        """The runtime's decoded tokens -> the block's (B, T, D): drops the start token."""
        return x[:, 1:] if self.spec.start_token else x

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

    def rope_rows(self, slot: int, n: int, like: torch.Tensor):
        """(cos, sin) of cache slots [slot, slot + n), each (n, head_dim) in like's dtype and device."""
        key = (like.device, like.dtype)
        if key not in self._rope:  # angles in float64, cos/sin cast once (ml-starflow: float32 angles)
            ang = self.spec.rope_angles()
            self._rope[key] = (ang.cos().to(like.device, like.dtype), ang.sin().to(like.device, like.dtype))
        cos, sin = self._rope[key]
        return cos[slot:slot + n], sin[slot:slot + n]

    def _layers(self, h, slot: int, cache, temp):
        """Every attention layer over h (R, n, C) at cache slots [slot, slot + n)."""
        n = h.shape[1]
        rope = self.rope_rows(slot, n, h) if self.spec.positions == "rope" else None
        mask = self.attention_mask(slot, n)
        for layer, layer_cache in zip(self.attn_blocks, cache or [None] * len(self.attn_blocks)):
            h = run_layer(self.spec, layer, h, cached_attention(layer_cache, slot, mask, rope), temp)
        return h

    def project(self, x, start=0, class_term=None, cache=None, temp=1.0, text=None):
        """Raw affine parameters (xa, xb) at positions start..start+n-1, in permuted order.

        Output j is computed from tokens <= start+j and parameterises token start+j+1.
        A text block with a cache reads its text from the cache's first text_length slots (`prefix` wrote
        them), so position p is cache slot text_length + p; without a cache (the forward pass) `text`
        (R, Lt, Dt) is run in the same causal pass, ahead of the tokens.
        """
        spec = self.spec
        n = x.shape[1]
        h = self.proj_in(x)
        if self.pos_embed is not None:
            h = h + self.permute(self.pos_embed, dim=0)[start:start + n]
        if class_term is not None:
            h = h + class_term
        slot = start
        if spec.text_width:
            if cache is not None:
                slot = start + spec.text_length
            else:
                if text is None or start != 0:
                    raise ValueError("a text block without a KV cache runs [text; tokens] in one pass from 0")
                h = torch.cat([self.proj_txt(text.to(h.dtype)), h], dim=1)
        h = self._layers(h, slot, cache, temp)[:, -n:]
        if spec.final_norm:
            h = self.final_norm(h)
        return self.split(self.proj_out(h))

    def prefix(self, text, cache, temp=1.0) -> None:
        """A text block's prefix pass (ml-starflow's reverse_step_condition): proj_txt(text) (R, Lt, Dt)
        through every layer, causal among the text too, filling cache slots [0, Lt)."""
        h = self.proj_txt(text.to(self.proj_txt.weight.dtype))
        self._layers(h, 0, cache, temp)

    def attention_mask(self, start: int, n: int):
        """Which keys [0, start+n) the queries at positions [start, start+n) may attend to (bool, True =
        attend), or None when every key is allowed (one causal query over its own cached prefix)."""
        if self.window is None:
            if n == 1:
                return None
            if self.pos_embed is not None:  # TarFlow: ml-tarflow's own mask buffer
                return self.attn_mask[start:start + n, :start + n].bool()
        device = self.proj_in.weight.device
        query = torch.arange(start, start + n, device=device)[:, None]
        key = torch.arange(start + n, device=device)[None]
        if self.window is None:
            return key <= query
        return (key <= query) & (key > query - self.window)

    def forward(self, x, y=None, text=None):
        """x (B, T, D) in image token order -> (z in image token order, logdet (B,), the mean over tokens and
        channels of log|dz/dx| as ml-tarflow). text (B, Lt, Dt): a STARFlow text block's prefix."""
        x = self.permute(x)
        if self.spec.start_token:  # position l reads [sos, x_0 .. x_{l-1}] (ml-starflow's get_prepared)
            inp = torch.cat([self.sos_embed.to(x.dtype).expand(x.shape[0], 1, -1), x[:, :-1]], dim=1)
            xa, xb = self.project(inp, 0, self.class_term(y), text=text)
        else:
            xa, xb = self.project(x, 0, self.class_term(y), text=text)
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
