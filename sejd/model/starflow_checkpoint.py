"""Loading apple/ml-starflow checkpoints unchanged and safely: the `.pth` state dict (torch.load with
weights_only=True: no code from the file runs) or a safetensors file, with the config from Apple's YAML
(`configs/starflow_3B_t2i_256x256.yaml`) and/or Model kwargs.

Every tensor is checked against the config's declaration (sejd/model/block.py) before the model is built:
same keys, same shapes, floating dtype. ml-starflow's deprecated buffers (`blocks.*.attn_mask`, `var`,
`feat_rope.freqs_*`) are dropped whether present or not (sample.py loads with strict=False; they are never
read). What sejd does not implement is refused in one line naming it (FACTS section 9).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from sejd.core.errors import CheckpointError, ConfigError
from sejd.core.memory import check_fits
from sejd.model.checkpoint import check_state_dict, read_pth, read_safetensors, require_readable
from sejd.model.starflow import UNSUPPORTED, StarFlow, StarFlowConfig

VAE_FACTOR = 8  # stabilityai/sd-vae-ft-ema downsamples by 8: sample.py builds Model with img_size // 8
IGNORED_BUFFERS = re.compile(r"^(var|feat_rope\.freqs_(cos|sin)|feat_rope_gen\.freqs_(cos|sin)|blocks\.\d+\.attn_mask)$")
# YAML argument names that differ from Model's kwargs (train.py's parser -> setup_transformer)
YAML_RENAMES = {"channel_size": "in_channels", "blocks": "num_blocks"}
# YAML arguments for training / sampling / data, not the model (ignored, as Model never sees them)
YAML_NOT_MODEL = {"no_flip", "fsdp", "fsdp_text_encoder", "noise_std", "batch_size", "lr", "min_lr", "nvp", "wds",
                  "gradient_checkpoint", "vae", "text", "cfg", "drop_label", "sample_freq", "latent_norm_regularization",
                  "epochs", "noise_type", "secondary_vae", "finetuned_vae", "logdir", "dataset", "data", "seed",
                  "noise_embed_denoiser", "warmup_steps", "grad_clip", "weight_decay", "ema", "mix_aspect",
                  "fps_cond", "cond_noise_level", "save_freq", "log_freq", "denoiser_window"}


# ------------------------------------------------------------------------------------------------ config
def _scalar(text: str):
    """A YAML scalar the way the minimal parser reads it: int, float, or the string."""
    text = text.strip().strip("'\"")
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_arguments_yaml(text: str) -> list:
    """The `arguments:` list of ml-starflow's YAML config. PyYAML's safe_load when it is installed (it is not
    a sejd dependency); otherwise a minimal reader of exactly that layout: `arguments:` then `- key: value`
    lines (comments and blank lines skipped)."""
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"not a readable YAML config: {str(e).splitlines()[0]}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("arguments"), list):
            raise ConfigError("expected an ml-starflow YAML config: a mapping with an 'arguments:' list")
        return doc["arguments"]
    items, inside = [], False
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.split("#", 1)[0].rstrip()
        if not stripped.strip():
            continue
        if stripped == "arguments:":
            inside = True
            continue
        m = re.match(r"^\s*-\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.*)$", stripped)
        if not inside or not m:
            raise ConfigError(f"line {n}: expected '- key: value' under 'arguments:', got {line.strip()[:60]!r}")
        items.append({m[1]: _scalar(m[2]) if m[2].strip() else None})
    if not inside:
        raise ConfigError("expected an ml-starflow YAML config: a mapping with an 'arguments:' list")
    return items


def config_from_yaml(path: str | os.PathLike, vae_factor: int = VAE_FACTOR) -> tuple[dict, dict]:
    """Apple's YAML -> (Model kwargs, extras {noise_std, vae, text, ignored}). img_size there is in pixels:
    divided by the VAE factor as sample.py does; `blocks` is len(layers_per_block) when that has several
    entries (train.py); txt_dim is the text encoder's width, not in the YAML (the tensors give it)."""
    path = Path(path)
    require_readable(path, "YAML config")
    if path.stat().st_size > 1_000_000:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes is too large for an ml-starflow YAML config")
    args = {}
    for item in parse_arguments_yaml(path.read_text(encoding="utf-8", errors="replace")):
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"{path}: each 'arguments:' item must be one 'key: value', got {str(item)[:60]!r}")
        args.update(item)
    kwargs, extras = {}, {"ignored": []}
    for key, value in args.items():
        name = YAML_RENAMES.get(key, key)
        if key in ("noise_std", "vae", "text"):
            extras[key] = value
        elif key in YAML_NOT_MODEL:
            extras["ignored"].append(key)
        elif name == "layers_per_block":
            values = value.split() if isinstance(value, str) else value if isinstance(value, list) else [value]
            try:
                kwargs[name] = [int(v) for v in values]
            except (TypeError, ValueError):
                raise ConfigError(f"{path}: layers_per_block must be integers, got {value!r}") from None
        else:
            kwargs[name] = value
    if isinstance(extras.get("vae"), str) and not extras["vae"].startswith("stabilityai/"):
        raise ConfigError(f"{path}: vae {extras['vae']!r} is out of scope: sejd supports the image model "
                          "(stabilityai/sd-vae-ft-ema latents); video VAEs (STARFlow-V) are not")
    if isinstance(kwargs.get("img_size"), int) and not isinstance(kwargs["img_size"], bool):
        if kwargs["img_size"] % vae_factor:
            raise ConfigError(f"{path}: img_size {kwargs['img_size']} px is not a multiple of the VAE factor {vae_factor}")
        kwargs["img_size"] //= vae_factor
    lpb = kwargs.get("layers_per_block")
    if isinstance(lpb, list) and len(lpb) > 1:
        if "num_blocks" in kwargs and kwargs["num_blocks"] != len(lpb):
            raise ConfigError(f"{path}: blocks {kwargs['num_blocks']} but layers_per_block has {len(lpb)} entries")
        kwargs["num_blocks"] = len(lpb)
    return kwargs, extras


# ------------------------------------------------------------------------------------------- state dict
def _refuse_out_of_scope(sd: dict, where: str) -> None:
    """One line naming what the tensors are, when they are not ml-starflow's image model."""
    keys = list(sd)

    def has(pattern):
        return next((k for k in keys if re.search(pattern, k)), None)

    if (k := has(r"^learnable_self_denoiser\.")):
        raise CheckpointError(f"{where}: has a learnable self-denoiser ({k}): out of scope (sejd supports the "
                              "released image model, learnable_self_denoiser=0)")
    for pattern, what in ((r"\.(query_norm|key_norm)\.", "qk-norm"), (r"\.gate_proj\.", "SwiGLU MLPs"),
                          (r"\.post_norm\.", "post-norm layers")):
        if (k := has(pattern)):
            raise CheckpointError(f"{where}: has {what} ({k}): out of scope (a pretrained-LM deep block or another "
                                  "block variant; sejd supports LayerNorm + GELU blocks with biases)")
    if (k := has(r"^blocks\.\d+\.pos_embed$")):
        if not has(r"\.sos_embed$") and not has(r"\.final_norm\.weight$"):
            raise CheckpointError(f"{where}: this is an ml-tarflow (TarFlow) checkpoint ({k}, no sos_embed): load it "
                                  "with sejd.model.checkpoint.load_checkpoint, not as STARFlow")
        raise CheckpointError(f"{where}: has learned positions ({k}): rope=0 is out of scope (sejd supports rope=1)")
    if has(r"^blocks\.") and not has(r"\.sos_embed$"):
        raise CheckpointError(f"{where}: no blocks.*.sos_embed: sos=0 is out of scope (sejd supports sos=1)")


def _infer(sd: dict, given: dict) -> dict:
    """Model kwargs the tensors fix (for those the caller did not give): in_channels (with patch_size 1 when
    not given), channels, txt_dim, layers_per_block, num_blocks, use_final_norm."""
    out = {}
    try:
        blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    except ValueError:
        raise CheckpointError("malformed key names: expected blocks.<int>.*") from None
    if not blocks or blocks != list(range(len(blocks))):
        raise CheckpointError(f"blocks are not numbered 0..{len(blocks) - 1}: found {blocks[:8]}")
    out["num_blocks"] = len(blocks)
    counts = []
    for i in blocks:
        layers = {int(k.split(".")[3]) for k in sd if k.startswith(f"blocks.{i}.attn_blocks.") and k.split(".")[3].isdigit()}
        if layers != set(range(len(layers))):
            raise CheckpointError(f"blocks.{i}'s attention layers are not numbered 0..{len(layers) - 1}")
        counts.append(len(layers))
    out["layers_per_block"] = counts
    C, D = sd["blocks.0.proj_in.weight"].shape if "blocks.0.proj_in.weight" in sd else (None, None)
    if C is None:
        raise CheckpointError("missing blocks.0.proj_in.weight: not an ml-starflow state dict")
    out["channels"] = int(C)
    p = given.get("patch_size", 1)
    if isinstance(p, int) and p > 0 and D % (p * p) == 0:
        out["in_channels"] = int(D) // (p * p)
    last = f"blocks.{len(blocks) - 1}.proj_txt.weight"
    out["txt_dim"] = int(sd[last].shape[1]) if last in sd else 0
    out["cond_top_only"] = not ("blocks.0.proj_txt.weight" in sd and len(blocks) > 1)
    out["use_final_norm"] = "blocks.0.final_norm.weight" in sd
    return out


def build_starflow(sd: dict, config: StarFlowConfig, where: str = "state dict", noise_std: float = 0.0,
                   float32: bool = True) -> StarFlow:
    """The model holding sd's tensors (Apple's unused buffers dropped), built on the meta device first so a
    15 GB checkpoint is in memory once; in float32, or (`float32=False`) the tensors themselves, as they are."""
    sd = {k: v for k, v in sd.items() if not IGNORED_BUFFERS.match(k)}
    with torch.device("meta"):
        model = StarFlow(config, noise_std)
    check_state_dict(model, sd, where)
    model.load_state_dict({k: v.float() for k, v in sd.items()} if float32 else sd, assign=True)
    model.var = torch.ones(config.num_tokens, config.token_dim)  # non-persistent: made here, not loaded
    return model.eval().requires_grad_(False)


def load_starflow(path: str | os.PathLike, config: "StarFlowConfig | dict | str | os.PathLike | None" = None,
                  vae_factor: int = VAE_FACTOR, mapped: bool = False, **kwargs) -> StarFlow:
    """An ml-starflow checkpoint (`.pth` or `.safetensors`) -> an eval-mode StarFlow.

    `config`: ml-starflow Model kwargs (a dict or StarFlowConfig), or the path of Apple's YAML config (its
    `arguments:`; img_size in pixels there, divided by `vae_factor`); `kwargs` add or override Model kwargs.
    Kwargs neither gives come from the tensors (widths, layer counts, txt_dim) or Model's defaults; head_dim
    (64) and the rope/softplus/clip options are not visible in the tensors and must come from the config.

    `mapped`: a `.pth`'s tensors stay in the file, memory-mapped, in the checkpoint's dtype (bf16 for Apple's):
    for `sejd export`, which converts each tensor to float32 as it writes it, so the model is never in memory.
    """
    path = Path(path)
    require_readable(path, "checkpoint")
    extras: dict = {}
    if isinstance(config, StarFlowConfig):
        given = config.to_dict()
    elif isinstance(config, dict):
        given = dict(config)
    elif config is None:
        given = {}
    elif isinstance(config, (str, os.PathLike)):
        given, extras = config_from_yaml(config, vae_factor)
    else:
        raise ConfigError(f"config must be Model kwargs, a StarFlowConfig or a YAML path, got {type(config).__name__}")
    given.update(kwargs)
    mapped = mapped and path.suffix != ".safetensors"
    if not mapped:
        check_fits(path.stat().st_size, f"reading {path}")
    sd = read_safetensors(path)[0] if path.suffix == ".safetensors" else read_pth(path, mmap=mapped)
    _refuse_out_of_scope(sd, str(path))
    for k, v in UNSUPPORTED.items():  # refused with the config's own words before any shape comparison
        if k in given and given[k] != v and not (k == "top_block_channels" and given[k] == given.get("channels")):
            StarFlowConfig.from_dict({k: given[k]})
    inferred = _infer(sd, given)
    for k, v in inferred.items():
        if k in given and k in ("channels", "txt_dim", "num_blocks") and given[k] != v:
            raise ConfigError(f"config {k}={given[k]!r} contradicts the tensors ({k}={v})")
    merged = {**{k: v for k, v in inferred.items() if k not in given}, **given}
    if isinstance(merged.get("layers_per_block"), list) and len(merged["layers_per_block"]) == 1:
        merged["layers_per_block"] = merged["layers_per_block"] * merged["num_blocks"]
    if merged.get("txt_dim") and not merged.get("txt_size"):
        raise ConfigError(f"the checkpoint has a text block (txt_dim {merged['txt_dim']}) but the config gives no "
                          "txt_size (the text length; ml-starflow's 3B: 128)")
    cfg = StarFlowConfig.from_dict(merged)
    noise_std = extras.get("noise_std", 0.0)
    model = build_starflow(sd, cfg, str(path), float(noise_std) if isinstance(noise_std, (int, float)) else 0.0,
                           float32=not mapped)
    model.meta = {k: v for k, v in extras.items() if k != "noise_std"}
    return model


STARFLOW_KEYS = (".sos_embed", ".final_norm.weight", ".proj_txt.weight")  # ml-starflow's, never ml-tarflow's


def is_starflow_checkpoint(path: str | os.PathLike, config=None) -> bool:
    """Whether `path` holds an ml-starflow checkpoint, told from its key names without reading its tensors
    (safetensors: the header; .pth: a memory-mapped, weights-only load) or from `config` (Apple's YAML
    path, or Model kwargs only STARFlow has). A folder or an unreadable file is not: the TarFlow loader then
    says what is wrong with it."""
    if isinstance(config, (str, os.PathLike)) and str(config).endswith((".yaml", ".yml")):
        return True
    if isinstance(config, dict) and {"txt_size", "sos", "rope", "use_softplus"} & set(config):
        return True
    path = Path(path)
    if not path.is_file():
        return False
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            obj = obj.get("model", obj) if isinstance(obj, dict) else obj
            keys = list(obj) if isinstance(obj, dict) else []
    except Exception:  # not ours to judge here: the loader reading it names the problem
        return False
    return any(isinstance(k, str) and k.endswith(STARFLOW_KEYS) for k in keys)
