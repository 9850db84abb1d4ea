"""`sejd export`: a checkpoint becomes a bundle of verified ONNX graphs, written atomically."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import onnx

import sejd
from sejd.bundle import MANIFEST, SCHEMA_VERSION, BundleError, load_bundle, sha256_file
from sejd.errors import SejdError
from sejd.export.contracts import (BLOCK_VARIANTS, DEFAULT_OPSET, DEFAULT_UNROLL, MODEL_VARIANTS, VARIANTS,
                                   contract)
from sejd.export.onnx_export import export_block_variant, export_forward
from sejd.model.checkpoint import load_checkpoint, save_checkpoint
from sejd.files import atomic_dir, folder_with
from sejd.util import progress


def check_onnx(model: onnx.ModelProto, what: str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        raise SejdError(f"exported {what} failed onnx.checker (full_check): {e}") from None


def export_bundle(source, out: str | os.PathLike, variants=None, unroll: int = DEFAULT_UNROLL,
                  opset: int = DEFAULT_OPSET, batch_max: int = 64, force: bool = False, show_progress: bool = True):
    variants = list(variants or VARIANTS)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SejdError(f"unknown variants {unknown}; expected a subset of {list(VARIANTS)}")
    if unroll < 1 or batch_max < 1 or not (17 <= opset <= 21):
        raise SejdError(f"need unroll >= 1, batch_max >= 1 and 17 <= opset <= 21; got unroll={unroll}, "
                        f"batch_max={batch_max}, opset={opset}")
    out = Path(out)
    if out.exists() and not force:
        raise SejdError(f"{out} exists; pass --force to replace it")
    if out.exists() and not folder_with(MANIFEST)(out):
        raise SejdError(f"{out} exists and is not a sejd bundle (no {MANIFEST}); refusing to replace it")
    model = load_checkpoint(source)
    cfg = model.config
    source_path = Path(str(source)) if not str(source).startswith("builtin:") else None
    # the old bundle (if any) is replaced only by a verified new one, and only with --force: a target that
    # appears meanwhile makes the final move fail (atomic_dir re-checks at the moment of the move)
    with atomic_dir(out, replace=folder_with(MANIFEST) if force else None) as tmp:
        save_checkpoint(model, tmp / "model", **model.meta)
        jobs = [(k, v) for k in range(cfg.num_blocks) for v in variants if v in BLOCK_VARIANTS]
        jobs += [(None, v) for v in variants if v in MODEL_VARIANTS]
        graphs = []
        for k, v in progress(jobs, desc="export", enabled=show_progress):
            onnx_model = export_forward(model, opset) if v == "forward" else \
                export_block_variant(model, k, v, unroll, opset)
            check_onnx(onnx_model, f"{v} of block {k}")
            rel = "forward.onnx" if k is None else f"blocks/{k}/{v}.onnx"
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            onnx.save_model(onnx_model, tmp / rel)
            c = contract(cfg, v, unroll)
            graphs.append({"block": k, "variant": v, "file": rel, "sha256": sha256_file(tmp / rel),
                           "inputs": [s.to_dict() for s in c.inputs], "outputs": [s.to_dict() for s in c.outputs],
                           "atol": c.atol})
        files = {f.relative_to(tmp).as_posix(): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        manifest = {
            "schema": SCHEMA_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "config": cfg.to_dict(),
            "noise_std": model.noise_std,
            "source": {"name": str(source),
                       "sha256": (sha256_file(source_path) if source_path and source_path.is_file()
                                  else files["model/model.safetensors"])},
            "opset": opset, "unroll": unroll, "batch_max": batch_max,
            "graphs": graphs, "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        load_bundle(tmp)  # verify what was written before it becomes visible
    return load_bundle(out)


def _versions() -> dict:
    import onnxruntime
    import torch

    return {"sejd": sejd.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


__all__ = ["export_bundle", "BundleError"]
