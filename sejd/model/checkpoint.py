"""Checked weight loading: ml-tarflow `.pth` state dicts and sejd's own safetensors + JSON format.

ml-tarflow checkpoints are plain `torch.save(state_dict)` files without a config. The config comes
from the caller, from the file name convention `{dataset}_model_{patch}_{channels}_{blocks}_{layers}_{noise}.pth`,
or from the tensor shapes; whatever the source, it is checked against every tensor before loading.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch

from sejd.errors import CheckpointError, ConfigError
from sejd.model.tarflow import TarFlow, TarFlowConfig
from sejd.util import atomic_write

FILENAME_RE = re.compile(
    r"^(?P<dataset>.+?)_model_(?P<patch>\d+)_(?P<channels>\d+)_(?P<blocks>\d+)_(?P<layers>\d+)_(?P<noise>[0-9.eE+-]+)$")
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_PREFIX = "builtin:"


def builtin_names() -> list[str]:
    return sorted(p.name for p in BUILTIN_DIR.glob("*") if (p / "config.json").exists()) if BUILTIN_DIR.exists() else []


def resolve_source(source: str | os.PathLike) -> Path:
    """`builtin:NAME` -> the shipped model folder; anything else is a path that must exist."""
    s = str(source)
    if s.startswith(BUILTIN_PREFIX):
        name = s[len(BUILTIN_PREFIX):]
        path = BUILTIN_DIR / name
        if not (path / "config.json").exists():
            raise CheckpointError(f"unknown builtin model {name!r}; available: {builtin_names() or 'none'}")
        return path
    path = Path(s)
    if not path.exists():
        raise CheckpointError(f"checkpoint {s!r} does not exist")
    return path


def config_from_filename(path: Path) -> dict:
    """The fields the ml-tarflow file name convention carries (plus noise_std), or {} if it does not match."""
    m = FILENAME_RE.match(path.stem)
    if not m:
        return {}
    try:
        noise = float(m["noise"])
    except ValueError:
        return {}  # looks like the convention but is not: infer everything from the tensors
    return {"patch_size": int(m["patch"]), "channels": int(m["channels"]), "num_blocks": int(m["blocks"]),
            "layers_per_block": int(m["layers"]), "noise_std": noise}


def config_from_state_dict(sd: dict, head_dim: int = 64, patch_size: int | None = None) -> dict:
    """Infer every config field the tensors determine. head_dim cannot be inferred (defaults to 64)."""
    try:
        return _infer_config(sd, head_dim, patch_size)
    except (ValueError, IndexError, TypeError) as e:  # malformed key names or shapes
        raise CheckpointError(f"not a TarFlow state dict: cannot read its layout ({e}); expected keys like "
                              f"blocks.0.attn_blocks.0.attention.qkv.weight") from None


def _infer_config(sd: dict, head_dim: int, patch_size: int | None) -> dict:
    def shape(key):
        if key not in sd:
            raise CheckpointError(f"missing key {key!r}: not a TarFlow state dict (found e.g. {sorted(sd)[:3]})")
        return tuple(sd[key].shape)

    num_blocks = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    if num_blocks == 0:
        raise CheckpointError(f"no 'blocks.*' keys: not a TarFlow state dict (found e.g. {sorted(sd)[:3]})")
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("blocks.0.attn_blocks."))
    T, C = shape("blocks.0.pos_embed")
    _, D = shape("blocks.0.proj_in.weight")
    out_dim, _ = shape("blocks.0.proj_out.weight")
    hidden, _ = shape("blocks.0.attn_blocks.0.mlp.main.0.weight")
    side = int(round(T**0.5))
    if side * side != T:
        raise CheckpointError(f"blocks.0.pos_embed has {T} tokens, which is not a square number")
    if patch_size is None:  # D = in_channels * p^2: prefer 1 or 3 channels
        candidates = [p for p in (1, 2, 4, 8, 16, 3, 5, 6, 7) if D % (p * p) == 0]
        patch_size = next((p for p in candidates if D // (p * p) in (3, 1)), candidates[0])
    num_classes = shape("blocks.0.class_embed")[0] if "blocks.0.class_embed" in sd else 0
    return {"in_channels": D // patch_size**2, "img_size": side * patch_size, "patch_size": patch_size,
            "channels": C, "num_blocks": num_blocks, "layers_per_block": layers, "head_dim": head_dim,
            "expansion": hidden // C, "nvp": out_dim == 2 * D, "num_classes": num_classes}


def check_state_dict(model: TarFlow, sd: dict, where: str) -> None:
    """Same key set and same shape for every tensor, or a CheckpointError naming the difference."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: state dict keys do not match config {model.config}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, ref in expected.items():
        if tuple(sd[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{where}: {key} has shape {tuple(sd[key].shape)}, "
                                  f"config {model.config} expects {tuple(ref.shape)}")
        if not sd[key].is_floating_point():
            raise CheckpointError(f"{where}: {key} has dtype {sd[key].dtype}, expected a floating tensor")


def read_pth(path: Path) -> dict:
    """A `.pth` of plain tensors, loaded with weights_only=True (no code from the file ever runs)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to unpickle anything but plain tensors "
                              f"(weights_only=True): {str(e).splitlines()[0]}") from None
    except Exception as e:  # torch raises many kinds on garbage input (KeyError, EOFError, RuntimeError, ...)
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or another format?): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a state dict of name -> tensor, got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def sejd_files(path: Path) -> tuple[Path, Path] | None:
    """sejd's format: a folder with model.safetensors + config.json, or a NAME.safetensors + NAME.json pair."""
    if path.is_dir():
        return path / "model.safetensors", path / "config.json"
    if path.suffix in (".safetensors", ".json"):
        return path.with_suffix(".safetensors"), path.with_suffix(".json")
    return None


def load_checkpoint(path: str | os.PathLike, config: TarFlowConfig | dict | None = None) -> TarFlow:
    """Load a TarFlow from an ml-tarflow `.pth`, sejd's format, or `builtin:NAME`; returns an eval-mode model.

    The model carries `model.config`, `model.noise_std` (training noise, 0 if unknown) and `model.meta`.
    """
    path = resolve_source(path)
    meta: dict = {}
    files = sejd_files(path)
    if files is not None:
        weights, cfg_file = files
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{path}: sejd checkpoint is missing {f.name}")
        try:
            meta = json.loads(cfg_file.read_text())
            from safetensors.torch import load_file
            sd = load_file(weights)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON: {e}") from None
        except Exception as e:  # safetensors raises its own SafetensorError on truncation
            raise CheckpointError(f"{weights}: not a readable safetensors file: {e}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise CheckpointError(f"{cfg_file}: expected an object with a 'config' object, got "
                                  f"{sorted(meta) if isinstance(meta, dict) else type(meta).__name__}")
        given = meta["config"]
        for k, v in (config.to_dict() if isinstance(config, TarFlowConfig) else dict(config or {})).items():
            if k in given and given[k] != v:
                raise ConfigError(f"config {k}={v} contradicts the checkpoint's own config ({k}={given[k]}) "
                                  f"in {cfg_file}")
        inferred = config_from_state_dict(sd, given.get("head_dim", 64), given.get("patch_size"))
    else:
        sd = read_pth(path)
        from_name = config_from_filename(path)
        if from_name:
            meta["noise_std"] = from_name.pop("noise_std")
        given = config.to_dict() if isinstance(config, TarFlowConfig) else dict(config or {})
        for k, v in from_name.items():
            if k in given and given[k] != v:
                raise ConfigError(f"config {k}={given[k]} contradicts the file name {path.name} ({k}={v})")
            given.setdefault(k, v)
        inferred = config_from_state_dict(sd, given.get("head_dim", 64), given.get("patch_size"))
    if isinstance(config, TarFlowConfig):
        config = config.to_dict()
    merged = {**inferred, **given, **(config or {})}
    cfg = TarFlowConfig.from_dict(merged)
    model = TarFlow(cfg)
    check_state_dict(model, sd, str(path))
    model.load_state_dict(sd)
    model.eval().requires_grad_(False)
    model.noise_std = float(meta.get("noise_std", 0.0))
    model.meta = {k: v for k, v in meta.items() if k != "config"}
    return model


def save_checkpoint(model: TarFlow, path: str | os.PathLike, **meta) -> Path:
    """Write sejd's format: PATH/model.safetensors + PATH/config.json (atomically). Returns the folder."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"config": model.config.to_dict(), "noise_std": getattr(model, "noise_std", 0.0), **meta}
    with atomic_write(path / "model.safetensors", binary=True) as tmp:
        save_file(sd, tmp)
    with atomic_write(path / "config.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")
    return path
