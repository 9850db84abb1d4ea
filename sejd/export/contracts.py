"""The input/output contract of every graph variant, declared once.

Export (names, dynamic axes), dummy inputs, input validation before a backend call, the bundle
manifest and the README's table are all generated from these declarations. A test fails when a
declared variant has no parity test.

Symbolic dimensions: `batch` (B samples), `rows` (R = B, or 2B for classifier-free guidance: the
conditional rows first), `window` (tokens in a window). Everything else is static per model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from sejd.core.errors import InputError
from sejd.model.starflow import StarFlowConfig
from sejd.model.tarflow import TarFlowConfig

DEFAULT_OPSET = 18
DEFAULT_UNROLL = 8
FP32_ATOL = 1e-4  # engine vs PyTorch, per output of one pass (docs/contracts.md)
FP32_CHAINED_ATOL = 1e-3  # outputs of up to T-1 dependent passes (loops): round-off compounds through exp
# Reduced precision (weights and matrix products in fp16/bf16; LayerNorm, softmax, exp in fp32), against
# the fp32 PyTorch reference: (one pass, chained passes: jacobi_k and the loops). Set at about twice the
# worst error `sejd check` measured on builtin:textures, all 4 blocks, H200 (docs/gpu/checks.json): fp16
# one pass 5.2e-3, jacobi_k 3.9e-2; bf16 one pass 4.7e-2, jacobi_k 0.35. Chained passes compound: 8 Jacobi
# passes from an arbitrary iterate through the first-sampled block amplify round-off the most.
PRECISION_ATOL = {"fp32": (FP32_ATOL, FP32_CHAINED_ATOL), "fp16": (1e-2, 0.1), "bf16": (0.1, 0.75)}
CHAINED_VARIANTS = ("jacobi_k", "jacobi_loop", "sequential_loop")
BLOCK_VARIANTS = ("step_present", "step_rows", "window", "jacobi", "jacobi_k", "jacobi_loop", "sequential_loop")
MODEL_VARIANTS = ("forward",)
VARIANTS = BLOCK_VARIANTS + MODEL_VARIANTS
# What `sejd export` writes unless --variants says otherwise: the graphs some tuned plan ran on a backend that
# runs here (docs/variants.md). step_rows: the single-token step of every engine backend (ort-cpu falls back
# to it without the native step); window: GS-Jacobi and the GPU runners; jacobi: every Jacobi plan; forward:
# density evaluation. Not by default: step_present (superseded by step_rows), jacobi_k and the two Loop graphs
# (never picked by tuning: host-driven calls and the native step beat them on the CPU; the GPU runners capture
# their own loops).
DEFAULT_VARIANTS = ("step_rows", "window", "jacobi", "forward")
# STARFlow (sejd/model/starflow.py): contracts per block (heterogeneous depth, the text block's prefix). `prefix`
# fills a text block's KV-cache slots [0, Lt) once per batch; the other graphs read them. Not exported for
# STARFlow: `forward` (density runs on the PyTorch model) and the Loop graphs (jacobi_loop, sequential_loop).
STARFLOW_VARIANTS = ("prefix", "step_present", "step_rows", "window", "jacobi", "jacobi_k")
STARFLOW_DEFAULT_VARIANTS = ("prefix", "step_rows", "window", "jacobi")
TEXT_ONLY_VARIANTS = ("prefix",)  # exported only for blocks that have text
ALL_VARIANTS = VARIANTS + TEXT_ONLY_VARIANTS
STARFLOW_NOTE = ("STARFlow bundle: graphs per block (the text block's `prefix` fills its KV cache's first Lt slots "
                 "once per batch); runtime position p of a block is KV-cache slot Lt + p and token 0 is the start "
                 "token; `forward` (density) and the Loop graphs are not exported for STARFlow: the density runs "
                 "on the PyTorch model in model/")


def is_starflow(cfg) -> bool:
    return isinstance(cfg, StarFlowConfig)


@dataclasses.dataclass(frozen=True)
class BlockDims:
    """The sizes one block's graph contracts are made of. TarFlow: the model's (every block alike). STARFlow:
    block k's own: `num_tokens` is the runtime's T + 1 (token 0 the start token), `cache_tokens` the KV cache's
    slots (text prefix first), the text block's text (text_length x text_width)."""

    num_tokens: int
    token_dim: int
    layers_per_block: int
    num_heads: int
    head_dim: int
    num_classes: int = 0
    cache_tokens: int = 0
    text_length: int = 0
    text_width: int = 0
    starflow: bool = False

    @property
    def guided_rows(self) -> bool:
        """Whether guidance doubles this block's rows (ml-starflow guides the text block only)."""
        return not self.starflow or self.text_length > 0


def block_dims(cfg, block: int | None = None) -> BlockDims:
    if not is_starflow(cfg):
        return BlockDims(cfg.num_tokens, cfg.token_dim, cfg.layers_per_block, cfg.num_heads, cfg.head_dim,
                         cfg.num_classes, cfg.num_tokens)
    if block is None or not 0 <= block < cfg.num_blocks:
        raise InputError(f"STARFlow graph contracts are per block: a block index from 0 to {cfg.num_blocks - 1} is "
                         f"needed, got {block!r}")
    s = cfg.block_spec(block)
    return BlockDims(s.run_tokens, s.token_dim, s.layers, s.heads, s.head_dim, 0, s.cache_slots, s.text_length,
                     s.text_width, True)


def block_specs(cfg) -> list:
    """Every block's BlockSpec (a TarFlow's are all alike)."""
    if is_starflow(cfg):
        return [cfg.block_spec(k) for k in range(cfg.num_blocks)]
    return [cfg.block_spec] * cfg.num_blocks


def family_variants(cfg) -> tuple[tuple, tuple]:
    """(the variants a model of this family can export, its default variants)."""
    return (STARFLOW_VARIANTS, STARFLOW_DEFAULT_VARIANTS) if is_starflow(cfg) else (VARIANTS, DEFAULT_VARIANTS)


def block_variants(cfg, block: int, variants) -> list[str]:
    """The block graphs of `variants` block `block` has (the text-only ones on text blocks only)."""
    text = is_starflow(cfg) and cfg.has_text(block)
    return [v for v in variants if v not in MODEL_VARIANTS and (text or v not in TEXT_ONLY_VARIANTS)]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # ints and symbolic names

    def resolve(self, dims: dict) -> tuple:
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclasses.dataclass(frozen=True)
class GraphContract:
    variant: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str
    atol: float = FP32_ATOL
    unroll: int = 1
    dims: BlockDims | None = dataclasses.field(default=None, compare=False)  # the sizes it was made of

    @property
    def input_names(self):
        return [s.name for s in self.inputs]

    @property
    def output_names(self):
        return [s.name for s in self.outputs]

    def dynamic_axes(self) -> dict:
        axes = {}
        for s in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(s.shape) if isinstance(d, str)}
            if named:
                axes[s.name] = named
        return axes

    def validate(self, feeds: dict) -> dict:
        """Check names, dtypes, ranks and static dims; bind symbolic dims consistently. Returns the dims."""
        dims: dict = {}
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"{self.variant}: missing inputs {missing}; expected {self.input_names}")
        for spec in self.inputs:
            value = feeds[spec.name]
            dtype = str(value.dtype).replace("torch.", "")
            if dtype != spec.dtype:
                raise InputError(f"{self.variant}: input {spec.name!r} must be {spec.dtype}, got {dtype}")
            shape = tuple(value.shape)
            if len(shape) != len(spec.shape):
                raise InputError(f"{self.variant}: input {spec.name!r} must have shape {spec.shape}, got {shape}")
            for want, got in zip(spec.shape, shape):
                if isinstance(want, str):
                    if dims.setdefault(want, got) != got:
                        raise InputError(f"{self.variant}: input {spec.name!r} has {want}={got}, but another "
                                         f"input has {want}={dims[want]} (shape {spec.shape}, got {shape})")
                elif want != got:
                    raise InputError(f"{self.variant}: input {spec.name!r} must have shape {spec.shape}, got {shape}")
        if "rows" in dims and "batch" in dims and dims["rows"] not in (dims["batch"], 2 * dims["batch"]):
            raise InputError(f"{self.variant}: rows must be batch or 2*batch (guidance), got rows={dims['rows']} "
                             f"for batch={dims['batch']}")
        return dims

    def to_dict(self) -> dict:
        return {"variant": self.variant, "description": self.description, "atol": self.atol,
                "inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}


def _f(name, *shape):
    return TensorSpec(name, "float32", shape)


def _i(name, *shape):
    return TensorSpec(name, "int64", shape)


def cache_specs(cfg: TarFlowConfig, prefix: str, tokens: int | None = None) -> list[TensorSpec]:
    tokens = getattr(cfg, "cache_tokens", 0) or cfg.num_tokens if tokens is None else tokens
    shape = ("rows", cfg.num_heads, tokens, cfg.head_dim)
    return [_f(f"{prefix}.{l}.{kv}", *shape) for l in range(cfg.layers_per_block) for kv in ("key", "value")]


def cond_specs(cfg: TarFlowConfig) -> list[TensorSpec]:
    labels = [_i("labels", "rows")] if cfg.num_classes else []
    return labels + [_f("temps", "rows"), _f("guidance", 2, cfg.num_tokens)]


def prefix_specs(d: BlockDims) -> list[TensorSpec]:
    """A text block's text prefix keys (rope applied) and values per layer: KV-cache slots [0, Lt)."""
    return cache_specs(d, "prefix", tokens=d.text_length)


def starflow_contract(d: BlockDims, variant: str, unroll: int = DEFAULT_UNROLL) -> GraphContract:
    """A STARFlow block's graph: the TarFlow contract over the runtime's T + 1 tokens and the cache's
    Lt + T + 1 slots, no labels; the text block's Jacobi graphs read the prefix keys/values as inputs."""
    if variant not in STARFLOW_VARIANTS:
        raise InputError(f"variant {variant!r} is not exported for STARFlow; STARFlow bundles have "
                         f"{', '.join(STARFLOW_VARIANTS)}")
    if variant == "prefix":
        if not d.text_length:
            raise InputError("variant 'prefix' exists only for a STARFlow block with text")
        return dataclasses.replace(GraphContract(
            variant, (_f("text", "rows", d.text_length, d.text_width),), tuple(prefix_specs(d)),
            "the text block's prefix pass: text embeddings (cond rows, then uncond rows) through every layer, causal "
            "among the text -> each layer's keys (rope applied) and values, the KV cache's slots [0, Lt)"), dims=d)
    c = block_contract(d, variant, unroll)
    inputs = c.inputs
    if d.text_length and variant in ("jacobi", "jacobi_k"):  # z, x, then the prefix, then the conditioning
        inputs = (*inputs[:2], *prefix_specs(d), *inputs[2:])
    note = (" (STARFlow: runtime position p is cache slot Lt + p; token 0 is the start token"
            + ("; the text prefix is read from the cache's first Lt slots" if d.text_length and variant not in
               ("jacobi", "jacobi_k") else "; the text prefix's keys/values are inputs" if d.text_length else "")
            + ")")
    return dataclasses.replace(c, inputs=inputs, description=c.description + note, dims=d)


def block_contract(cfg: TarFlowConfig, variant: str, unroll: int = DEFAULT_UNROLL) -> GraphContract:
    T, D = cfg.num_tokens, cfg.token_dim
    cond = cond_specs(cfg)
    tok = ("batch", T, D)
    if variant == "step_present":
        return GraphContract(variant, (_f("x", "batch", 1, D), _i("pos"), *cache_specs(cfg, "past"), *cond),
                             (_f("xa", "batch", 1, D), _f("xb", "batch", 1, D), *cache_specs(cfg, "present")),
                             "one token at position `pos` over a fixed-size KV cache -> its affine parameters "
                             "(for token pos+1) and the cache with this token written at `pos`")
    if variant == "step_rows":
        return GraphContract(variant, (_f("x", "batch", 1, D), _i("pos"), *cache_specs(cfg, "past"), *cond),
                             (_f("xa", "batch", 1, D), _f("xb", "batch", 1, D), *cache_specs(cfg, "new", tokens=1)),
                             "one token at position `pos` over a read-only cache of positions < pos -> its affine "
                             "parameters and only its own keys/values, which the host writes into the cache in "
                             "place (no per-step cache copy)")
    if variant == "window":
        return GraphContract(variant, (_f("x", "batch", "window", D), _i("start"), *cache_specs(cfg, "past"), *cond),
                             (_f("xa", "batch", "window", D), _f("xb", "batch", "window", D),
                              *cache_specs(cfg, "present")),
                             "tokens at positions start..start+window-1 over the cache of positions < start "
                             "(GS-Jacobi segments, frozen prefixes)")
    if variant == "jacobi":
        return GraphContract(variant, (_f("z", *tok), _f("x", *tok), *cond),
                             (_f("x_next", *tok), _f("residual", "batch")),
                             "one parallel Jacobi iteration x -> F(x), residual = max |x_next - x| per sample")
    if variant == "jacobi_k":
        return GraphContract(variant, (_f("z", *tok), _f("x", *tok), *cond),
                             (_f("x_next", *tok), _f("residual", "batch"), _f("residuals", unroll, "batch")),
                             f"{unroll} Jacobi iterations unrolled (static, CUDA-graph friendly); residual of "
                             "the last and of every iteration", unroll=unroll)
    if variant == "jacobi_loop":
        return GraphContract(variant, (_f("z", *tok), _f("x0", *tok), _f("tau"), _i("max_iters"), *cond),
                             (_f("x", *tok), _f("residual", "batch"), _i("iterations")),
                             "ONNX Loop of Jacobi iterations until max residual < tau or min(max_iters, T-1)",
                             atol=FP32_CHAINED_ATOL)
    if variant == "sequential_loop":
        return GraphContract(variant, (_f("z", *tok), *cond), (_f("x", *tok),),
                             "the whole exact sequential inversion of the block as one ONNX Loop over tokens",
                             atol=FP32_CHAINED_ATOL)
    raise InputError(f"unknown block variant {variant!r}; expected one of {BLOCK_VARIANTS}")


def forward_contract(cfg: TarFlowConfig) -> GraphContract:
    labels = [_i("labels", "batch")] if cfg.num_classes else []
    return GraphContract("forward", (_f("image", "batch", cfg.in_channels, cfg.img_size, cfg.img_size), *labels),
                         (_f("z", "batch", cfg.num_tokens, cfg.token_dim), _f("logdet", "batch")),
                         "the model's forward pass (likelihood): image, labels (-1 = unconditional) -> z, logdet")


def contract(cfg: TarFlowConfig, variant: str, unroll: int = DEFAULT_UNROLL, block: int | None = None) -> GraphContract:
    """The contract of a variant; STARFlow's are per block (`block`)."""
    if is_starflow(cfg):
        if variant not in STARFLOW_VARIANTS:  # before the block: the variant is what is wrong
            starflow_contract(None, variant)
        return starflow_contract(block_dims(cfg, block), variant, unroll)
    if variant == "prefix":
        raise InputError("variant 'prefix' is a STARFlow text block's graph; TarFlow bundles have "
                         f"{', '.join(VARIANTS)}")
    return forward_contract(cfg) if variant == "forward" else block_contract(cfg, variant, unroll)


def tolerance(c: GraphContract, precision: str = "fp32") -> float:
    """The absolute tolerance of a graph built at `precision` against the fp32 PyTorch reference."""
    if precision == "fp32" or c.variant == "forward":  # forward is always built in fp32
        return c.atol
    one_pass, chained = PRECISION_ATOL[precision]
    return chained if c.variant in CHAINED_VARIANTS else one_pass


def profile_shapes(c: GraphContract, batch_max: int, opt_batch: int, num_tokens: int) -> dict[str, tuple]:
    """(min, opt, max) shapes of every input of contract `c` with a symbolic axis: the optimisation
    profile TensorRT (and ONNX Runtime's TensorRT provider) builds for, covering batch 1..batch_max
    (2*batch_max guidance rows) and windows 1..T, tuned for `opt_batch`."""
    ranges = {"batch": (1, opt_batch, batch_max), "rows": (1, opt_batch, 2 * batch_max),
              "window": (1, min(8, num_tokens), num_tokens)}
    shapes = {}
    for spec in c.inputs:
        if any(isinstance(d, str) for d in spec.shape):
            shapes[spec.name] = tuple(tuple(ranges[d][i] if isinstance(d, str) else d for d in spec.shape)
                                      for i in range(3))
    return shapes


def dummy_inputs(c: GraphContract, cfg: TarFlowConfig, batch: int = 2, cfg_rows: bool = False, window: int = 3,
                 seed: int = 0, tau: float = 0.0) -> dict[str, np.ndarray]:
    """Seeded inputs that satisfy the contract and exercise it (labels incl. -1, non-trivial caches)."""
    g = torch.Generator().manual_seed(seed)
    d = c.dims
    starflow = d is not None and d.starflow
    if d is not None:
        cfg = d
        cfg_rows = cfg_rows and d.guided_rows  # a STARFlow block without text runs its B rows only
    dims = {"batch": batch, "rows": 2 * batch if cfg_rows else batch, "window": window}
    T = cfg.num_tokens
    feeds = {}
    for s in c.inputs:
        shape = s.resolve(dims)
        if s.name == "labels":
            v = torch.randint(-1, cfg.num_classes, shape, generator=g)
            if cfg_rows:
                v[batch:] = -1
        elif s.name == "temps":
            v = torch.ones(shape) if not cfg_rows or starflow else torch.cat([torch.ones(batch), 0.5 + torch.rand(batch, generator=g)])
        elif s.name == "guidance":
            v = torch.rand(shape, generator=g) * 2 if cfg_rows else torch.zeros(shape)
        elif s.name == "pos":
            v = torch.randint(0, T, (), generator=g)
        elif s.name == "start":
            v = torch.randint(0, T - window + 1, (), generator=g)
        elif s.name == "tau":
            v = torch.tensor(float(tau))
        elif s.name == "max_iters":
            v = torch.tensor(T - 1)
        elif s.name.startswith(("past.", "prefix.")):
            v = torch.randn(shape, generator=g)
        elif s.name == "image":
            v = torch.rand(shape, generator=g) * 2 - 1
        else:
            v = torch.randn(shape, generator=g)
        feeds[s.name] = v.numpy().astype(s.dtype)
    return feeds


def markdown(cfg: TarFlowConfig | None = None, unroll: int = DEFAULT_UNROLL) -> str:
    """The contracts as a Markdown table (docs/contracts.md is generated from this)."""
    cfg = cfg or TarFlowConfig(in_channels=3, img_size=32, patch_size=2, channels=128, num_blocks=4,
                               layers_per_block=2, num_classes=10)
    lines = ["# Graph contracts\n",
             f"Generated by `python -m sejd.export.contracts` from `sejd/export/contracts.py`, shown for "
             f"T={cfg.num_tokens}, D={cfg.token_dim}, {cfg.layers_per_block} layers, {cfg.num_heads} heads of "
             f"{cfg.head_dim}, a conditional model (unconditional models have no `labels` input), "
             f"jacobi_k unrolled {unroll}x. Symbolic axes: `batch`, `rows` (= batch, or 2*batch with guidance, "
             f"conditional rows first), `window`. Tolerance: fp32 max abs error <= {FP32_ATOL} per output of "
             f"one pass, <= {FP32_CHAINED_ATOL} for the loops, whose outputs chain up to T-1 dependent passes. "
             f"Graphs built in reduced precision (`sejd build --precision fp16|bf16`: weights and matrix products "
             f"in that type, LayerNorm, softmax and exp in fp32) keep the same float32 inputs and outputs and are "
             f"held to the per-precision tolerances given with each variant (`forward` is always fp32).\n"]
    for v in VARIANTS:
        c = contract(cfg, v, unroll)
        tols = ", ".join(f"{p} {tolerance(c, p):g}" for p in PRECISION_ATOL)
        lines.append(f"## `{v}`\n\n{c.description}. Tolerance (max abs vs the fp32 reference): {tols}.\n")
        lines.append("| | name | dtype | shape |\n|---|---|---|---|")
        for kind, specs in (("in", c.inputs), ("out", c.outputs)):
            for s in specs:
                lines.append(f"| {kind} | `{s.name}` | {s.dtype} | ({', '.join(map(str, s.shape))}) |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
