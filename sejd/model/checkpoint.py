"""Checked weight loading: ml-tarflow `.pth` state dicts and sejd's own safetensors + JSON format.

ml-tarflow checkpoints are plain `torch.save(state_dict)` files without a config. The config comes
from the caller, from the file name convention `{dataset}_model_{patch}_{channels}_{blocks}_{layers}_{noise}.pth`,
or from the tensor shapes; whatever the source, every field the tensors fix is compared with them before
a model is built (so a file name claiming 10**9 blocks fails at once; sejd/model/layout.py), and every
tensor's shape after.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import stat
from pathlib import Path

import torch

from sejd.core.errors import CheckpointError, ConfigError
from sejd.core.files import atomic_write, read_json
from sejd.core.memory import check_fits
from sejd.model.layout import (
    check_against_tensors,
    choose_geometry,
    read_layout,
    warn_guessed,
)
from sejd.model.tarflow import TarFlow, TarFlowConfig

FILENAME_RE = re.compile(
    r"^(?P<dataset>.+?)_model_(?P<patch>\d+)_(?P<channels>\d+)_(?P<blocks>\d+)_(?P<layers>\d+)_(?P<noise>[0-9.eE+-]+)$")
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_PREFIX = "builtin:"
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header
RECORDED_CONFIG = "sejd_config"  # safetensors header key: the config the tensors were saved with


def builtin_names() -> list[str]:
    return sorted(p.name for p in BUILTIN_DIR.glob("*") if (p / "config.json").exists()) if BUILTIN_DIR.exists() else []


def resolve_source(source: str | os.PathLike) -> Path:
    """`builtin:NAME` -> the shipped model folder; anything else is a path that must exist."""
    s = str(source)
    if s.startswith(BUILTIN_PREFIX):
        name = s[len(BUILTIN_PREFIX):]
        path = BUILTIN_DIR / name
        if name not in builtin_names():  # a name, not a path: builtin:../../x must not load what lies there
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


def check_state_dict(model, sd: dict, where: str) -> None:
    """(A TarFlow or a StarFlow) same key set and same shape for every tensor, or a CheckpointError naming the difference."""
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


def refuse_starflow(sd: dict, where) -> None:
    """An ml-starflow state dict (start tokens, rope: no pos_embed) given as TarFlow, refused in one line."""
    key = next((k for k in sd if k.endswith((".sos_embed", ".final_norm.weight"))), None)
    if key is not None:
        raise CheckpointError(f"{where}: this is an ml-starflow (STARFlow) checkpoint ({key}): load it with "
                              "sejd.model.starflow_checkpoint.load_starflow, not as TarFlow")


def read_pth(path: Path, mmap: bool = False) -> dict:
    """A `.pth` of plain tensors, loaded with weights_only=True (no code from the file ever runs). `mmap`: the
    tensors stay in the file, mapped, and are read as they are used (files in torch's zip format; others are
    read whole)."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
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


def require_readable(path: Path, what: str) -> None:
    """Say why a file cannot be read (missing, a dangling link, a directory, no permission) before handing
    it to a reader library whose own message would mislead ("No such device", "No such file")."""
    if path.is_symlink() and not path.exists():
        raise CheckpointError(f"{path}: the {what} is a dangling symbolic link (to {os.readlink(path)})")
    if not path.exists():
        raise CheckpointError(f"{path}: the {what} is missing")
    if path.is_dir():
        raise CheckpointError(f"{path}: the {what} is a directory, expected a file")
    if not path.is_file():  # opening a FIFO would block
        raise CheckpointError(f"{path}: the {what} is not a regular file")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        st = path.stat()
        raise CheckpointError(f"{path}: permission denied reading the {what} (mode {stat.filemode(st.st_mode)}, "
                              f"owner uid {st.st_uid}, this process runs as uid {os.geteuid()})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: the {what} cannot be read: {e.strerror or e}") from None


def read_safetensors(weights: Path) -> tuple[dict, dict | None]:
    """The tensors, and the config recorded in the header by `save_checkpoint` (None in older files)."""
    require_readable(weights, "weights file")
    check_fits(weights.stat().st_size, f"reading {weights}")
    from safetensors import safe_open
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError on truncation
        raise CheckpointError(f"{weights}: not a readable safetensors file: {_truncation(weights) or e}") from None
    if RECORDED_CONFIG not in header:
        return sd, None
    try:
        recorded = json.loads(header[RECORDED_CONFIG])
    except json.JSONDecodeError:
        recorded = None
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{weights}: the config recorded in its header ({RECORDED_CONFIG}) is not a JSON object")
    return sd, recorded


def _truncation(weights: Path) -> str | None:
    """"truncated: ..." when the file is shorter than its own header says (read from the first bytes only)."""
    size = weights.stat().st_size
    with open(weights, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, shorter than the 8-byte header length"
        n = int.from_bytes(head, "little")
        if n > SAFETENSORS_MAX_HEADER:
            return None  # not a safetensors file at all: the reader's own message says more
        if 8 + n > size:
            return f"truncated: the header alone says {8 + n} bytes, the file has {size}"
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            return None  # not a safetensors header at all: the reader's own message says more
    return f"truncated: its tensors end at byte {8 + n + end}, the file has {size}" if 8 + n + end > size else None


def _read_sejd(path: Path, files: tuple[Path, Path], explicit: dict) -> tuple[dict, dict, dict, dict]:
    """sejd's format -> (state dict, config.json's contents, config fields, where each field came from)."""
    weights, cfg_file = files
    for f in files:
        if not (f.exists() or f.is_symlink()):
            raise CheckpointError(f"{path}: sejd checkpoint is missing {f.name}")
    require_readable(cfg_file, "config file")
    meta = read_json(cfg_file, "config file", CheckpointError)  # a regular file, size-bounded, UTF-8 JSON
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{cfg_file}: expected an object with a 'config' object, got "
                              f"{sorted(meta) if isinstance(meta, dict) else type(meta).__name__}")
    given = dict(meta["config"])
    for k, v in explicit.items():
        if k in given and given[k] != v:
            raise ConfigError(f"config {k}={v} contradicts the checkpoint's own config ({k}={given[k]}) "
                              f"in {cfg_file}")
    sd, recorded = read_safetensors(weights)
    sources = {k: str(cfg_file) for k in given}
    for k, v in (recorded or {}).items():  # head_dim is known only from here: the tensors do not fix it
        if k in given and given[k] != v:
            raise ConfigError(f"{cfg_file} says {k}={given[k]!r}, but {weights.name} was saved with {k}={v!r} "
                              f"(recorded in its header); config.json was edited or belongs to another checkpoint")
        given.setdefault(k, v)
        sources.setdefault(k, f"recorded in {weights}")
    for k, v in explicit.items():
        given.setdefault(k, v)
        sources.setdefault(k, "given config")
    return sd, meta, given, sources


def _read_ml_tarflow(path: Path, explicit: dict) -> tuple[dict, dict, dict, dict]:
    """An ml-tarflow `.pth` -> (state dict, {noise_std} from its name, config fields, their sources)."""
    require_readable(path, "checkpoint")
    check_fits(path.stat().st_size, f"reading {path}")
    sd = read_pth(path)
    from_name = config_from_filename(path)
    meta = {"noise_std": from_name.pop("noise_std")} if from_name else {}
    given, sources = dict(explicit), {k: "given config" for k in explicit}
    for k, v in from_name.items():
        if k in given and given[k] != v:
            raise ConfigError(f"config {k}={given[k]} contradicts the file name {path.name} ({k}={v})")
        given.setdefault(k, v)
        sources.setdefault(k, f"file name {path.name}")
    return sd, meta, given, sources


def _build(cfg: TarFlowConfig, sd: dict, where: str) -> TarFlow:
    """The model holding `sd`'s tensors themselves: built on the meta device (no memory, no random
    initialisation for weights about to be replaced), so a 1.8 GB checkpoint is in memory once."""
    with torch.device("meta"):
        model = TarFlow(cfg)
    check_state_dict(model, sd, where)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)  # float16 files load as float32
    return model.eval().requires_grad_(False)


def _noise_std(value, where) -> float:
    """The training noise sigma (self-denoising uses it): a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CheckpointError(f"{where}: noise_std must be a finite number >= 0 (the training noise sigma), "
                              f"got {str(value)[:40]!r}")
    return float(value)


def load_checkpoint(path: str | os.PathLike, config: TarFlowConfig | dict | None = None) -> TarFlow:
    """Load a TarFlow from an ml-tarflow `.pth`, sejd's format, or `builtin:NAME`; returns an eval-mode model.

    The model carries `model.config`, `model.noise_std` (training noise, 0 if unknown) and `model.meta`,
    whose "geometry" says where the patch size came from: "given" (a config or config.json), "file name",
    "tensor shapes" (the only fit) or "guessed" (see `choose_geometry`).
    Every config field is checked against the tensors before the model is built.
    """
    path = resolve_source(path)
    if config is not None and not isinstance(config, (dict, TarFlowConfig)):
        raise ConfigError(f"config must be a dict of TarFlowConfig fields or a TarFlowConfig, "
                          f"got {type(config).__name__}")
    explicit = config.to_dict() if isinstance(config, TarFlowConfig) else dict(config or {})
    files = sejd_files(path)
    sd, meta, given, sources = _read_sejd(path, files, explicit) if files else _read_ml_tarflow(path, explicit)
    refuse_starflow(sd, path)
    layout = read_layout(sd)
    patch_size, geometry = choose_geometry(layout, given, sources)
    inferred = layout.config(given.get("head_dim", 64), patch_size)
    check_against_tensors(given, sources, inferred, layout)
    model = _build(TarFlowConfig.from_dict({**inferred, **given}), sd, str(path))
    if geometry == "guessed":
        warn_guessed(layout, patch_size)
    model.noise_std = _noise_std(meta.get("noise_std", 0.0), path)
    # a sejd checkpoint exported from a guessed geometry keeps saying so
    model.meta = {"geometry": geometry, **{k: v for k, v in meta.items() if k != "config"}}
    return model


def save_checkpoint(model: TarFlow, path: str | os.PathLike, **meta) -> Path:
    """Write sejd's format: PATH/model.safetensors + PATH/config.json (atomically). Returns the folder.

    The config is also recorded in the safetensors header, so an edited config.json (a head_dim the
    tensors cannot reveal) is refused on load instead of silently building another model."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"config": model.config.to_dict(), "noise_std": getattr(model, "noise_std", 0.0), **meta}
    with atomic_write(path / "model.safetensors") as tmp:
        save_file(sd, tmp, metadata={RECORDED_CONFIG: json.dumps(model.config.to_dict())})
    with atomic_write(path / "config.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")
    return path
