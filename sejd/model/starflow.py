"""STARFlow: Apple's text-to-image autoregressive flow (apple/ml-starflow, the image `Model`), built from the
same block declaration as TarFlow (sejd/model/block.py) with STARFlow's options.

Field names of `StarFlowConfig` are the kwargs of ml-starflow's `transformer_flow.Model`, so a checkpoint's
YAML arguments map onto it (sejd/model/starflow_checkpoint.py); anything of Model's that the released image
model does not use (video, learnable self-denoiser, a pretrained-LM deep block, SwiGLU / qk-norm / GQA /
RMSNorm / post-norm layers, learned positions, no start token, another top-block width) is refused by name.

Shapes: B batch, (c, H*p, W*p) latents, T = H*W tokens of D = c*p*p channels, C model width, text (B, Lt, Dt).
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import torch
from torch import nn

from sejd.core.errors import ConfigError, InputError
from sejd.model.block import ROPE_TEXT_PAIRS, BlockSpec
from sejd.model.tarflow import MetaBlock, TokenGeometry

# Plausibility bounds (like tarflow.py's), generous against the released 3B t2i model (T = 1024 tokens,
# 3072 channels, 6 blocks of [2,2,2,2,2,24] layers, 128 text tokens of 2048, 15.4 GB of float32 weights):
# a typo or a hostile config fails at once instead of sizing tensors from it.
MAX_TOKENS = 16384
MAX_LAYERS = 1024
MAX_TEXT_TOKENS = 4096
MAX_TEXT_WIDTH = 65536
MAX_WEIGHT_BYTES = 64 * 2**30  # 4x the 3B model's float32 weights

# Model kwargs sejd does not implement, with the only value it accepts (ml-starflow's parser defaults, which
# the image t2i configs keep); FACTS section 9 says what each one is.
UNSUPPORTED = {
    "num_heads": None, "num_kv_heads": None, "use_swiglu": False, "use_bias": True, "use_qk_norm": False,
    "use_post_norm": False, "hf_style_rope": False, "norm_type": "layer_norm", "use_pretrained_lm": None,
    "use_mm_attn": False, "learnable_self_denoiser": False, "conditional_denoiser": False, "temporal_causal": 0,
    "top_block_channels": None, "shallow_block_local": False, "local_attn_window": None, "vid_size": None,
    "adaln": False,
}
WHAT = {"num_heads": "explicit head counts", "num_kv_heads": "grouped-query attention",
        "use_swiglu": "SwiGLU MLPs", "use_bias": "bias-free layers", "use_qk_norm": "qk-norm",
        "use_post_norm": "post-norm layers", "hf_style_rope": "half-split rope", "norm_type": "RMSNorm layers",
        "use_pretrained_lm": "a pretrained-LM deep block", "use_mm_attn": "multimodal attention",
        "learnable_self_denoiser": "the learnable self-denoiser", "conditional_denoiser": "the learnable self-denoiser",
        "temporal_causal": "video (STARFlow-V)", "top_block_channels": "a deep block of another width",
        "shallow_block_local": "video (STARFlow-V)", "local_attn_window": "local attention (STARFlow-V)",
        "vid_size": "video (STARFlow-V)", "adaln": "adaLN"}


def _is_int(v, minimum=1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


@dataclasses.dataclass(frozen=True)
class StarFlowConfig(TokenGeometry):
    """ml-starflow `Model` kwargs (the image path). img_size is the *latent* size (ml-starflow's sample.py
    divides the YAML's pixel size by the VAE's factor 8 before building Model)."""

    in_channels: int
    img_size: int
    patch_size: int
    channels: int
    num_blocks: int
    layers_per_block: tuple[int, ...] | int  # one count for every block, or one per block (heterogeneous)
    head_dim: int = 64
    expansion: int = 4
    rope: bool = True
    pt_seq_len: int | None = None  # None: img_size // patch_size
    sos: bool = True
    txt_size: int = 0  # Lt, the text length (padded)
    txt_dim: int = 0  # Dt, the text encoder's width (flan-t5-xl: 2048); 0: no text
    cond_top_only: bool = False
    use_softplus: bool = False
    use_final_norm: bool = False
    soft_clip: float = 0.0
    seq_order: str = "R2L"

    def __post_init__(self):
        lpb = self.layers_per_block
        if isinstance(lpb, list):
            object.__setattr__(self, "layers_per_block", lpb := tuple(lpb))
        for name in ("in_channels", "img_size", "patch_size", "channels", "num_blocks", "head_dim", "expansion"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ConfigError(f"StarFlowConfig.{name} must be a positive int, got {value!r}")
        counts = lpb if isinstance(lpb, tuple) else (lpb,)
        if not counts or not all(_is_int(n) for n in counts):
            raise ConfigError(f"StarFlowConfig.layers_per_block must be a positive int or a list of them, got {lpb!r} "
                              "(zero-layer IdentityBlocks are not supported)")
        if isinstance(lpb, tuple) and len(lpb) not in (1, self.num_blocks):
            raise ConfigError(f"layers_per_block has {len(lpb)} entries, expected 1 or num_blocks = {self.num_blocks}")
        for name in ("txt_size", "txt_dim"):
            if not _is_int(getattr(self, name), 0):
                raise ConfigError(f"StarFlowConfig.{name} must be an int >= 0, got {getattr(self, name)!r}")
        for name in ("rope", "sos", "cond_top_only", "use_softplus", "use_final_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"StarFlowConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if not self.rope:
            raise ConfigError("rope=0 (learned pos_embed) is out of scope: sejd supports ml-starflow's rope=1 image model")
        if not self.sos:
            raise ConfigError("sos=0 (no start token) is out of scope: sejd supports ml-starflow's sos=1 image model")
        if self.seq_order not in ("L2R", "R2L"):
            raise ConfigError(f"seq_order must be 'L2R' or 'R2L', got {self.seq_order!r}")
        if isinstance(self.soft_clip, bool) or not isinstance(self.soft_clip, (int, float)) \
                or not math.isfinite(self.soft_clip) or self.soft_clip < 0:
            raise ConfigError(f"soft_clip must be a finite number >= 0 (0: none), got {self.soft_clip!r}")
        if self.pt_seq_len is not None and not _is_int(self.pt_seq_len):
            raise ConfigError(f"pt_seq_len must be a positive int or null, got {self.pt_seq_len!r}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.channels % self.head_dim:
            raise ConfigError(f"channels {self.channels} is not a multiple of head_dim {self.head_dim}")
        if self.head_dim % 4 or (self.txt_size and self.head_dim // 2 <= ROPE_TEXT_PAIRS):
            raise ConfigError(f"head_dim {self.head_dim} must be a multiple of 4 for 2-D rope"
                              + (f" and above {2 * ROPE_TEXT_PAIRS} with a text axis (txt_size > 0)" if self.txt_size else ""))
        if bool(self.txt_dim) and not self.txt_size:
            raise ConfigError(f"txt_dim {self.txt_dim} needs txt_size > 0 (the text length), got 0")
        self._check_plausible()

    def _check_plausible(self) -> None:
        if self.num_tokens > MAX_TOKENS:
            raise ConfigError(f"img_size {self.img_size} / patch_size {self.patch_size} gives {self.num_tokens} tokens; "
                              f"at most {MAX_TOKENS} are supported (the released 256px model uses 1024)")
        if sum(self.layers) > MAX_LAYERS:
            raise ConfigError(f"{sum(self.layers)} attention layers in all; at most {MAX_LAYERS} are supported "
                              f"(the released 3B model has 34)")
        if self.txt_size > MAX_TEXT_TOKENS or self.txt_dim > MAX_TEXT_WIDTH:
            raise ConfigError(f"text {self.txt_size} x {self.txt_dim}; at most {MAX_TEXT_TOKENS} tokens of "
                              f"{MAX_TEXT_WIDTH} are supported (the released model: 128 x 2048)")
        nbytes = 4 * self.num_parameters
        if nbytes > MAX_WEIGHT_BYTES:
            raise ConfigError(f"this config needs {nbytes:.3g} bytes of float32 weights ({self.num_parameters:.3g} "
                              f"parameters); at most {MAX_WEIGHT_BYTES // 2**30} GiB are supported "
                              "(the released 3B model has 15.4 GB)")

    # ------------------------------------------------------------------ derived
    @property
    def layers(self) -> tuple[int, ...]:
        lpb = self.layers_per_block
        if isinstance(lpb, int):
            return (lpb,) * self.num_blocks
        return lpb * self.num_blocks if len(lpb) == 1 else lpb

    @property
    def grid(self) -> tuple[int, int]:
        s = self.img_size // self.patch_size
        return (s, s)

    def has_text(self, i: int) -> bool:
        """Which blocks own proj_txt and a text prefix: the deep one (blocks[-1]) only when cond_top_only."""
        return self.txt_dim > 0 and (i == self.num_blocks - 1 or not self.cond_top_only)

    def flips(self, i: int) -> bool:
        """ml-starflow alternates PermutationIdentity / PermutationFlip; L2R starts one later (the released
        L2R model flips blocks 0, 2, 4 and reads the deep block in raster order)."""
        return (i + (self.seq_order == "L2R")) % 2 == 1

    def block_spec(self, i: int) -> BlockSpec:
        text = self.has_text(i)
        return BlockSpec(
            self.num_tokens, self.token_dim, self.channels, self.head_dim, self.layers[i],
            self.expansion * self.channels, nvp=True, num_classes=0, bias=True,
            positions="rope", start_token=True, final_norm=self.use_final_norm,
            soft_clip=float(self.soft_clip) or None, affine_scale="softplus" if self.use_softplus else "exp",
            text_width=self.txt_dim if text else 0, text_length=self.txt_size if text else 0, guidance="starflow",
            grid=self.grid, rope_len=self.pt_seq_len or self.img_size // self.patch_size,
            rope_text_axis=self.txt_size > 0)

    @property
    def num_parameters(self) -> int:
        return sum(self.block_spec(i).num_parameters() for i in range(self.num_blocks))

    @property
    def text_block(self) -> int | None:
        return self.num_blocks - 1 if self.txt_dim else None

    def memory_view(self, guided_blocks: bool = True):
        """The sizes core.memory.sampling_estimate reads, for the largest block (its KV cache spans the text
        prefix and the runtime's T + 1 positions)."""
        return SimpleNamespace(num_tokens=self.txt_size + self.num_tokens + 1, token_dim=self.token_dim,
                               channels=self.channels, layers_per_block=max(self.layers), num_heads=self.num_heads,
                               head_dim=self.head_dim, expansion=self.expansion)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if isinstance(self.layers_per_block, tuple):
            d["layers_per_block"] = list(self.layers_per_block)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StarFlowConfig":
        """From ml-starflow Model kwargs; its kwargs sejd does not implement must hold their defaults."""
        if not isinstance(d, dict):
            raise ConfigError(f"a StarFlow config must be a dict of Model kwargs, got {type(d).__name__}")
        d = dict(d)
        for k, default in UNSUPPORTED.items():
            if k in d:
                v = d.pop(k)
                same = v == default or (not v and not default) or (k == "top_block_channels" and v == d.get("channels"))
                if not same:
                    raise ConfigError(f"{k}={v!r} ({WHAT[k]}) is out of scope: sejd supports ml-starflow's image model "
                                      f"({k}={default!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown StarFlowConfig fields {sorted(unknown)}; expected a subset of {sorted(fields)}")
        for k in ("rope", "sos", "cond_top_only", "use_softplus", "use_final_norm"):  # YAML / argparse give 0/1
            if k in d and isinstance(d[k], int) and not isinstance(d[k], bool) and d[k] in (0, 1):
                d[k] = bool(d[k])
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"incomplete StarFlowConfig {d}: {e}") from None


class StarFlow(nn.Module):
    """The flow: patchify, blocks[0..N-2] (shallow, no text), blocks[N-1] (deep, with the text prefix), a unit
    Gaussian prior. Sampling runs blocks[-1] first (sejd.runtime.sampler)."""

    var: torch.Tensor
    family = "starflow"

    def __init__(self, config: StarFlowConfig, noise_std: float = 0.0):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(MetaBlock(config.block_spec(i), flip=config.flips(i))
                                    for i in range(config.num_blocks))
        # the sampler scales noise by sqrt(var): ones (ml-starflow's own `var` buffer is deprecated and never
        # read, so it is not part of sejd's state dict either)
        self.register_buffer("var", torch.ones(config.num_tokens, config.token_dim), persistent=False)
        self.noise_std = noise_std  # training noise sigma for self_denoise (the released model: 0.3)
        self.meta: dict = {}

    # -------------------------------------------------------------- layout
    def patchify(self, x):
        """(B, c, H*p, W*p) -> (B, T, p*p*c): ml-starflow's '(p1 p2 c)' (channel fastest), raster tokens."""
        p = self.config.patch_size
        B, c, Hp, Wp = x.shape
        return x.reshape(B, c, Hp // p, p, Wp // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * c)

    def unpatchify(self, x):
        """(B, T, p*p*c) -> (B, c, H*p, W*p)."""
        p, (H, W) = self.config.patch_size, self.config.grid
        B = x.shape[0]
        c = x.shape[-1] // (p * p)
        return x.reshape(B, H, W, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, H * p, W * p)

    def check_text(self, text, batch: int, what: str = "text") -> torch.Tensor | None:
        """text embeddings (batch, Lt, Dt) for a text model, None for one without text; InputError otherwise."""
        cfg = self.config
        if not cfg.txt_dim:
            if text is not None:
                raise InputError(f"this STARFlow model has no text conditioning (txt_dim 0); {what} must be None")
            return None
        expected = (batch, cfg.txt_size, cfg.txt_dim)
        if not torch.is_tensor(text) or tuple(text.shape) != expected:
            got = tuple(text.shape) if torch.is_tensor(text) else type(text).__name__
            raise InputError(f"{what} embeddings must have shape {expected} (batch, txt_size, txt_dim), got {got}")
        if not text.is_floating_point() or not bool(torch.isfinite(text).all()):
            raise InputError(f"{what} embeddings must be finite floating-point values")
        return text.float()

    # -------------------------------------------------------------- density
    def forward(self, x, text=None):
        """Latents (B, c, H*p, W*p) -> (z in the same layout, log|det dz/dx| per sample (B,), the sum over
        blocks, tokens and channels). ml-starflow's Model.forward returns the per-block elementwise logdets
        (its loss takes their means); the sum is what a density needs."""
        text = self.check_text(text, x.shape[0])
        h = self.patchify(x)
        logdet = x.new_zeros(x.shape[0])
        n = self.config.num_tokens * self.config.token_dim
        for i, block in enumerate(self.blocks):
            h, ld = block(h, text=text if block.spec.text_width else None)
            logdet = logdet + ld * n  # the block returns the mean (ml-tarflow's convention)
        return self.unpatchify(h), logdet

    def log_prob(self, x, text=None):
        """Per-sample log-likelihood up to the prior's constant: -0.5 |z|^2 + log|det|."""
        z, logdet = self(x, text)
        return -0.5 * z.pow(2).flatten(1).sum(1) + logdet

    def self_denoise(self, x, text=None, noise_std: float | None = None):
        """ml-starflow's post-sampling step for the image model (no learnable denoiser): one Tweedie step
        x + sigma^2 grad_x log p(x | text) through the full flow, conditional text only (FACTS section 8)."""
        sigma = self.noise_std if noise_std is None else noise_std
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.log_prob(x, text).sum(), x)
        return (x + sigma**2 * g).detach()
