"""`sejd export`: a checkpoint becomes a bundle of verified ONNX graphs, written atomically."""

from __future__ import annotations

import datetime
import errno
import functools
import json
import os
import shutil
import sys
from pathlib import Path

import onnx

import sejd
from sejd.bundle import MANIFEST, SCHEMA_VERSION, BundleError, load_bundle, sha256_file
from sejd.errors import SejdError
from sejd.export.contracts import (BLOCK_VARIANTS, DEFAULT_OPSET, DEFAULT_UNROLL, MODEL_VARIANTS, VARIANTS,
                                   contract)
from sejd.export.onnx_export import export_block_variant, export_forward
from sejd.export.weights import INLINE_MAX_BYTES, WEIGHTS_FILE, WeightStore, save_external
from sejd.model.checkpoint import load_checkpoint, save_checkpoint
from sejd.util import atomic_dir, progress


def check_onnx(model, what: str) -> None:
    """The full ONNX checker on a ModelProto or, for graphs with external data, on the graph's path
    (the checker then verifies the external references without loading the weights)."""
    try:
        onnx.checker.check_model(str(model) if isinstance(model, (str, os.PathLike)) else model, full_check=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        raise SejdError(f"exported {what} failed onnx.checker (full_check): {e}") from None


def _disk_full_is_an_error(export):
    """A disk that fills during export is one line naming the target; atomic_dir has already removed the
    half-written temporary folder (scratch included), so nothing is left at the target."""
    @functools.wraps(export)
    def wrapper(source, out, *args, **kwargs):
        try:
            return export(source, out, *args, **kwargs)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise SejdError(f"no space left on the device while exporting to {out} ({e.strerror}); nothing was "
                            f"written there: free space (the bundle needs about 1.1x the checkpoint) and export "
                            f"again") from None
    return wrapper


@_disk_full_is_an_error
def export_bundle(source, out: str | os.PathLike, variants=None, unroll: int = DEFAULT_UNROLL,
                  opset: int = DEFAULT_OPSET, batch_max: int = 64, force: bool = False, show_progress: bool = True,
                  config=None):
    """`config`: the model's config (TarFlowConfig or dict) for a checkpoint whose file name does not
    carry it, as `load_checkpoint(config=...)`."""
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
    if out.exists() and not (out.is_dir() and (out / MANIFEST).exists()):
        raise SejdError(f"{out} exists and is not a sejd bundle (no {MANIFEST}); refusing to replace it")
    model = load_checkpoint(source, config=config)
    cfg = model.config
    source_path = Path(str(source)) if not str(source).startswith("builtin:") else None
    with atomic_dir(out) as tmp:  # the old bundle (if any) is replaced only by a verified new one
        save_checkpoint(model, tmp / "model", **model.meta)
        graphs, written = _export_graphs(model, tmp, variants, unroll, opset, show_progress)
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
            "graphs": graphs, "files": files, "weights": written,
        }
        if "geometry" in model.meta:  # where patch size and channels came from (file name, --config, shapes)
            manifest["geometry"] = model.meta["geometry"]
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        load_bundle(tmp)  # verify what was written before it becomes visible
    return load_bundle(out)


def _export_graphs(model, root: Path, variants, unroll: int, opset: int, show_progress: bool):
    """Every graph, streamed block by block into `root`: each is traced, its weights moved into the
    block's shared weight file (the forward graph's into the blocks' files where equal, else its own),
    its topology saved and checked, before the next one is made, so memory holds one graph at a time.
    Returns the manifest's graph entries and what was written."""
    cfg = model.config
    jobs = [(k, v) for k in range(cfg.num_blocks) for v in variants if v in BLOCK_VARIANTS]
    jobs += [(None, v) for v in variants if v in MODEL_VARIANTS]
    graphs = []
    bar = progress(jobs, desc="export", enabled=show_progress)
    with WeightStore(root) as store:
        for k, v in bar:
            rel = "forward.onnx" if k is None else f"blocks/{k}/{v}.onnx"
            export_graph_file(model, k, v, unroll, opset, store, rel)
            c = contract(cfg, v, unroll)
            graphs.append({"block": k, "variant": v, "file": rel, "sha256": sha256_file(root / rel),
                           "inputs": [s.to_dict() for s in c.inputs], "outputs": [s.to_dict() for s in c.outputs],
                           "atol": c.atol})
            if show_progress:
                bar.set_postfix_str(f"{_mb(store.bytes_written)} weights written")
    written = {"weight_files": store.files(), "weight_bytes": store.bytes_written,
               "deduplicated_bytes": store.bytes_deduplicated, "inline_max_bytes": INLINE_MAX_BYTES,
               "graph_bytes": sum((root / g["file"]).stat().st_size for g in graphs)}
    if show_progress:
        print(f"export: {len(graphs)} graphs, {_mb(written['graph_bytes'])} of topology, {_mb(store.bytes_written)} "
              f"of weights in {len(written['weight_files'])} shared files ({_mb(store.bytes_deduplicated)} "
              f"of equal tensors stored once)", file=sys.stderr)
    return graphs, written


def export_graph_file(model, k: int | None, variant: str, unroll: int, opset: int, store: WeightStore, rel: str,
                      dtype=None) -> Path:
    """Trace one graph (block k's variant, or the forward graph for k None) through a scratch folder beside
    it, move its weights into the store (block k's weight file, else forward.weights.bin), save its
    topology at store.root/rel and run the full checker on it. `dtype`: reduced-precision block graphs."""
    import torch

    store.target("forward.weights.bin" if k is None else f"blocks/{k}/{WEIGHTS_FILE}")
    scratch = store.root / ".scratch"
    scratch.mkdir(parents=True)
    try:
        onnx_model = export_forward(model, opset, scratch) if k is None else \
            export_block_variant(model, k, variant, unroll, opset, dtype or torch.float32, scratch)
        path = save_external(onnx_model, rel, store, base_dir=scratch)
    finally:
        shutil.rmtree(scratch)
    what = "the forward graph" if k is None else f"{variant} of block {k}"
    check_onnx(path, what if dtype is None else f"{dtype} {what}")
    return path


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _versions() -> dict:
    import onnxruntime
    import torch

    return {"sejd": sejd.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


__all__ = ["export_bundle", "BundleError"]
