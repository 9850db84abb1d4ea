"""What a TarFlow state dict's key names and block-0 shapes say about the model, and checking a config
against them: every config field but head_dim is fixed by the tensors; the patch size is the one thing
they leave open (token width = in_channels x patch^2), taken only when exactly one candidate has 1 or 3
image channels."""

from __future__ import annotations

import dataclasses
import logging
import math

from sejd.core.errors import CheckpointError, ConfigError

TENSOR_FIELDS = ("in_channels", "img_size", "patch_size", "channels", "num_blocks", "layers_per_block",
                 "expansion", "nvp", "num_classes", "bias")  # every config field but head_dim is fixed by the tensors
GEOMETRY_FIELDS = ("patch_size", "in_channels", "img_size")
IMAGE_CHANNELS = (1, 3)  # grayscale or RGB: what image TarFlows are trained on
MLP0 = "blocks.0.attn_blocks.0.mlp.main.0.weight"
BIAS0 = "blocks.0.attn_blocks.0.attention.qkv.bias"  # present exactly when the blocks have biases
log = logging.getLogger("sejd")


class ConfigMismatchError(ConfigError, CheckpointError):
    """A config (given, from the file name or from config.json) contradicts the checkpoint's tensors."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """What block 0's tensors and the key names say about the model."""

    num_blocks: int
    layers: int
    T: int  # tokens
    C: int  # model width
    D: int  # token width = in_channels * patch_size**2
    out_dim: int  # 2D for nvp, D otherwise
    hidden: int  # MLP width = expansion * C
    num_classes: int
    bias: bool

    @property
    def side(self) -> int:  # tokens per image side
        return math.isqrt(self.T)

    def geometries(self) -> list[tuple[int, int]]:
        """Every (patch_size, in_channels) with in_channels * patch_size**2 == D."""
        return [(p, self.D // (p * p)) for p in range(1, math.isqrt(self.D) + 1) if self.D % (p * p) == 0]

    def config(self, head_dim: int, patch_size: int) -> dict:
        return {"in_channels": self.D // patch_size**2, "img_size": self.side * patch_size, "patch_size": patch_size,
                "channels": self.C, "num_blocks": self.num_blocks, "layers_per_block": self.layers,
                "head_dim": head_dim, "expansion": self.hidden // self.C, "nvp": self.out_dim == 2 * self.D,
                "num_classes": self.num_classes, "bias": self.bias}


def read_layout(sd: dict) -> Layout:
    try:
        return _read_layout(sd)
    except (ValueError, IndexError, TypeError) as e:  # malformed key names or shapes
        raise CheckpointError(f"not a TarFlow state dict: cannot read its layout ({e}); expected keys like "
                              f"blocks.0.attn_blocks.0.attention.qkv.weight") from None


def _indices(sd: dict, prefix: str, position: int, what: str) -> int:
    """How many consecutive numbered modules `prefix<i>.` there are; a gap (a key such as blocks.999999999
    in a hostile file) is refused rather than sizing a model from the largest index."""
    found = {int(k.split(".")[position]) for k in sd if k.startswith(prefix)}
    if found != set(range(len(found))):
        gap = next(i for i in range(len(found)) if i not in found)  # never a range up to the largest index
        raise CheckpointError(f"{what} are not numbered 0..{len(found) - 1}: found {len(found)} with indices up to "
                              f"{max(found)} (no {prefix}{gap}.*)")
    return len(found)


def _read_layout(sd: dict) -> Layout:
    def shape(key):
        if key not in sd:
            raise CheckpointError(f"missing key {key!r}: not a TarFlow state dict (found e.g. {sorted(sd)[:3]})")
        return tuple(sd[key].shape)

    num_blocks = _indices(sd, "blocks.", 1, "flow blocks")
    if num_blocks == 0:
        raise CheckpointError(f"no 'blocks.*' keys: not a TarFlow state dict (found e.g. {sorted(sd)[:3]})")
    layers = _indices(sd, "blocks.0.attn_blocks.", 3, "block 0's attention layers")
    T, C = shape("blocks.0.pos_embed")
    _, D = shape("blocks.0.proj_in.weight")
    out_dim, _ = shape("blocks.0.proj_out.weight")
    hidden, _ = shape(MLP0)
    if math.isqrt(T) ** 2 != T:
        raise CheckpointError(f"blocks.0.pos_embed has {T} tokens, which is not a square number")
    num_classes = shape("blocks.0.class_embed")[0] if "blocks.0.class_embed" in sd else 0
    if hidden % C:
        raise CheckpointError(f"{MLP0} has shape {(hidden, C)}: the MLP width {hidden} is not a multiple of the "
                              f"model width {C} (expansion must be an integer)")
    return Layout(num_blocks, layers, T, C, D, out_dim, hidden, num_classes, BIAS0 in sd)


def _geometry_text(layout: Layout, geometries) -> str:
    return ", ".join(f"patch {p} x {c} channels ({layout.side * p}x{layout.side * p} images)" for p, c in geometries)


def choose_geometry(layout: Layout, given: dict, sources: dict) -> tuple[int, str]:
    """The patch size, and where it came from: "given" or "file name" when stated there, else from the
    tensors: "tensor shapes" when only one geometry fits the token width, "guessed" (with a warning) when
    exactly one of those that fit has 1 or 3 image channels (the caller warns, `warn_guessed`). Anything
    else is refused as ambiguous."""
    fits = layout.geometries()
    stated = [f for f in GEOMETRY_FIELDS if f in given]
    if stated:
        chosen = [(p, c) for p, c in fits
                  if given.get("patch_size", p) == p and given.get("in_channels", c) == c
                  and given.get("img_size", layout.side * p) == layout.side * p]
        if not chosen:
            said = ", ".join(f"{f}={given[f]!r} ({sources[f]})" for f in stated)
            raise ConfigMismatchError(
                f"{said} does not fit the checkpoint's tensors: blocks.0.proj_in.weight has token width "
                f"{layout.D} (= in_channels x patch_size^2) and blocks.0.pos_embed {layout.T} tokens; "
                f"geometries that fit: {_geometry_text(layout, fits)}")
        return chosen[0][0], "file name" if sources[stated[0]].startswith("file name") else "given"
    if len(fits) == 1:
        return fits[0][0], "tensor shapes"
    images = [(p, c) for p, c in fits if c in IMAGE_CHANNELS]
    if len(images) != 1:  # 3 p^2 = q^2 has no integer solution, so at most one candidate has 1 or 3 channels
        raise ConfigError(
            f"cannot tell the patch size from the tensors: token width {layout.D} fits {_geometry_text(layout, fits)}, "
            f"none with 1 or 3 image channels; pass --config '{{\"patch_size\": P, \"in_channels\": C}}' "
            f"(Python: load_checkpoint(path, config={{\"patch_size\": P, \"in_channels\": C}}))")
    return images[0][0], "guessed"


def warn_guessed(layout: Layout, patch_size: int) -> None:
    """One console line (logger "sejd") saying which geometry was guessed and how to choose another."""
    others = [g for g in layout.geometries() if g[0] != patch_size]
    log.warning("sejd: patch size guessed from the tensor shapes: token width %d = patch %d x %d channels "
                "(the only geometry with 1 or 3 image channels; also fits %s); pass --config "
                "'{\"patch_size\": P, \"in_channels\": C}' to choose", layout.D, patch_size,
                layout.D // patch_size**2, _geometry_text(layout, others))


def _evidence(field: str, layout: Layout, value) -> str:
    """Which tensors fix `field`, and what the contradicting value would need instead."""
    def need(shape_fn) -> str:
        return f", config expects {shape_fn()}" if isinstance(value, int) else ""
    if field == "num_blocks":
        n = layout.num_blocks
        return f"keys blocks.0 .. blocks.{n - 1}" + (f"; missing blocks.{n}" if isinstance(value, int) and value > n else "")
    if field == "layers_per_block":
        n = layout.layers
        return f"keys blocks.0.attn_blocks.0 .. {n - 1}" + \
            (f"; missing blocks.0.attn_blocks.{n}" if isinstance(value, int) and value > n else "")
    if field == "channels":
        return f"blocks.0.pos_embed has shape {(layout.T, layout.C)}" + need(lambda: (layout.T, value))
    if field == "expansion":
        return f"{MLP0} has shape {(layout.hidden, layout.C)}" + need(lambda: (value * layout.C, layout.C))
    if field == "nvp":
        return f"blocks.0.proj_out.weight has shape {(layout.out_dim, layout.C)}" + \
            need(lambda: ((2 if value else 1) * layout.D, layout.C))
    if field == "bias":
        return f"{BIAS0} is {'present' if layout.bias else 'absent'}"
    if field == "num_classes":
        return (f"blocks.0.class_embed has shape {(layout.num_classes, 1, layout.C)}" if layout.num_classes
                else "no blocks.0.class_embed (unconditional)")
    return f"blocks.0.proj_in.weight has token width {layout.D} and blocks.0.pos_embed {layout.T} tokens"


def check_against_tensors(given: dict, sources: dict, inferred: dict, layout: Layout) -> None:
    """Every given field the tensors fix must equal what they say, checked before any model is built: a
    file name or config claiming 10**9 blocks is refused here instead of allocating them."""
    for field in TENSOR_FIELDS:
        if field in given and given[field] != inferred[field]:
            raise ConfigMismatchError(
                f"{field}={given[field]!r} ({sources[field]}) contradicts the checkpoint's tensors, which say "
                f"{field}={inferred[field]!r}: {_evidence(field, layout, given[field])}")
