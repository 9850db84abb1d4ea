"""Train a TarFlow as ml-tarflow does: Gaussian noise on data in [-1, 1], loss 0.5*mean(z^2) - mean(logdet),
AdamW(0.9, 0.95) with warm-up and cosine decay, label dropout for classifier-free guidance, and an EMA copy.

Training state is checkpointed atomically and resumed when the same output folder is used again. A finished
checkpoint in the output folder is replaced only with `force`, and only when sejd saved it (`check_train_out`).
"""

from __future__ import annotations

import copy
import logging
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from sejd.core.files import atomic_write
from sejd.core.util import progress
from sejd.model.checkpoint import save_checkpoint
from sejd.model.tarflow import TarFlow, TarFlowConfig
from sejd.workflows.data import load_dataset

log = logging.getLogger(__name__)  # "sejd.workflows.train": shown by the CLI on stderr (-q hides it)


@torch.no_grad()
def evaluate_bpd(model: TarFlow, x, y, noise_std: float, seed: int = 0, batch: int = 128) -> float:
    """Mean bits/dim of (x + fixed seeded noise): deterministic, so it can be re-checked later."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g) * noise_std
    y = y if model.config.num_classes else None
    total = 0.0
    for i in range(0, len(x), batch):
        yb = None if y is None else y[i:i + batch]
        total += float(model.bits_per_dim(x[i:i + batch] + noise[i:i + batch], yb).sum())
    return total / len(x)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


CHECKPOINT_FILES = ("model.safetensors", "config.json")  # what save_checkpoint writes into a folder
STATE_FILE = "train_state.pt"


def check_train_out(out: str | Path, force: bool = False) -> None:
    """Before any work: `out` may hold a training state to resume (a regular file), and a checkpoint only if
    `force` and sejd saved it (config.json sejd's, model.safetensors with the config sejd records in its
    header). Other files in the folder are never touched."""
    from sejd.core.errors import SejdError
    from sejd.export.outputs import replace_only_ours

    out = Path(out)
    state = out / STATE_FILE
    if (state.exists() or state.is_symlink()) and (state.is_symlink() or not state.is_file()):
        raise SejdError(f"--out {out}: {STATE_FILE} is not a regular file; sejd resumes only from the one it wrote")
    present = [n for n in CHECKPOINT_FILES if (out / n).exists() or (out / n).is_symlink()]
    if not present:
        return
    replace_only_ours("--out", out, force, "a checkpoint sejd saved; training resumes from its " + STATE_FILE,
                      not_a_saved_checkpoint, present=f"holds a checkpoint ({', '.join(present)})")


def not_a_saved_checkpoint(folder: Path) -> str | None:
    """None when `folder` holds a checkpoint `save_checkpoint` wrote, else why not (regular files only, read
    with a size bound)."""
    import json

    from sejd.core.errors import SejdError
    from sejd.core.files import read_json
    from sejd.model.checkpoint import RECORDED_CONFIG

    for name in CHECKPOINT_FILES:
        if (folder / name).is_symlink() or not (folder / name).is_file():
            return f"{name} is missing or not a regular file"
    try:
        meta = read_json(folder / "config.json", "config.json", root=folder, limit=1 << 20)
    except SejdError as e:
        return str(e)
    if not (isinstance(meta, dict) and isinstance(meta.get("config"), dict)):
        return "config.json is not the config of a sejd checkpoint"
    try:  # safetensors: an 8-byte header length, then the JSON header
        with open(folder / "model.safetensors", "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size <= 1 << 24 else None
    except (OSError, ValueError, RecursionError):
        header = None
    if not (isinstance(header, dict) and RECORDED_CONFIG in (header.get("__metadata__") or {})):
        return "model.safetensors was not saved by sejd (no config recorded in its header)"
    return None


def train(dataset: str, config: TarFlowConfig, out: str | Path, steps: int, batch_size: int = 64,
          lr: float = 2e-3, noise_std: float = 0.05, drop_label: float = 0.1, ema_decay: float = 0.999,
          warmup: int = 200, seed: int = 0, ckpt_every: int = 200, threads: int | None = None,
          command: str | None = None, force: bool = True) -> dict:
    """`force`: replace a checkpoint sejd saved in `out` (see check_train_out; the CLI passes its --force, so
    `sejd train` asks for it; library callers resume and replace as before). Nothing else is ever replaced."""
    check_train_out(out, force)
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    data = load_dataset(dataset)
    torch.manual_seed(seed)
    model = TarFlow(config)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    state_file, step = out / "train_state.pt", 0
    if state_file.exists():  # resume
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step = int(state["step"])
        log.info("resumed %s at step %d", state_file, step)
    dims = config.in_channels * config.img_size**2
    bar = progress(range(step, steps), total=steps, initial=step, desc=f"train {dataset}")
    started = time.time()
    for step in bar:
        x, y = data.batch(batch_size, gen)
        x = x + noise_std * torch.randn(x.shape, generator=gen)
        if config.num_classes:
            y = torch.where(torch.rand(y.shape, generator=gen) < drop_label, -1, y)
        else:
            y = None
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        z, _, logdets = model(x, y)
        loss = model.get_loss(z, logdets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up: forget the random init quickly
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        bpd = (loss.item() + 0.5 * math.log(2 * math.pi) + math.log(128)) / math.log(2)
        bar.set_postfix(loss=f"{loss.item():.4f}", bpd=f"{bpd:.3f}")
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            with atomic_write(state_file) as tmp:
                torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                            "gen": gen.get_state(), "step": step + 1}, tmp)
            log.info("step %d/%d loss %.4f bpd~%.3f (%.0fs)", step + 1, steps, loss.item(), bpd,
                     time.time() - started)
    tx, ty = data.batch(512, torch.Generator().manual_seed(99))
    hx, hy = data.heldout()
    # ship whichever of the EMA and the raw weights generalises better
    candidates = {name: m.eval().requires_grad_(False) for name, m in (("ema", ema), ("raw", model))}
    scores = {name: evaluate_bpd(m, hx, hy, noise_std) for name, m in candidates.items()}
    chosen = min(scores, key=scores.get)
    ema = candidates[chosen]
    train_bpd, heldout_bpd = evaluate_bpd(ema, tx, ty, noise_std), scores[chosen]
    log.info("held-out bpd: %s; shipping %s", scores, chosen)
    ema.noise_std = noise_std
    meta = {"dataset": dataset, "training": {
        "command": command or " ".join(shlex.quote(a) for a in sys.argv), "steps": steps,
        "batch_size": batch_size, "lr": lr, "noise_std": noise_std, "drop_label": drop_label,
        "ema_decay": ema_decay, "seed": seed, "pixels": dims, "weights": chosen,
        "train_bpd": round(train_bpd, 4), "heldout_bpd": round(heldout_bpd, 4),
        "bpd_eval": "shipped weights; 512 training crops (seed 99) and the held-out set, each + noise_std noise (seed 0)"}}
    save_checkpoint(ema, out, **meta)
    log.info("wrote %s: train %.4f bpd, held-out %.4f bpd", out, train_bpd, heldout_bpd)
    return meta
