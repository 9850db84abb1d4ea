"""`sejd export`: a checkpoint becomes a bundle of verified ONNX graphs, written atomically."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import sys
from pathlib import Path

import onnx

from sejd.core.errors import SejdError
from sejd.core.files import atomic_dir
from sejd.core.util import progress
from sejd.core.version import VERSION
from sejd.export.bundle import (
    BATCH_MAX_LIMIT,
    MANIFEST,
    OPSETS,
    SCHEMA_VERSION,
    UNROLL_MAX,
    BundleError,
    int_in,
    is_replaceable_bundle,
    load_bundle,
    replaceable_bundle,
    sha256_file,
)
from sejd.export.contracts import (
    ALL_VARIANTS,
    DEFAULT_OPSET,
    DEFAULT_UNROLL,
    MODEL_VARIANTS,
    STARFLOW_NOTE,
    STARFLOW_VARIANTS,
    VARIANTS,
    block_variants,
    contract,
    family_variants,
    is_starflow,
)
from sejd.export.loops import forward_chain
from sejd.export.onnx_export import FORWARD_BODY, export_block_variant
from sejd.export.outputs import replace_only_ours
from sejd.export.weights import (
    INLINE_MAX_BYTES,
    WEIGHTS_FILE,
    Retarget,
    WeightStore,
    externalize,
    save_topology,
)
from sejd.model.checkpoint import load_checkpoint, save_checkpoint


def check_onnx(model, what: str) -> None:
    """The full ONNX checker on a ModelProto or, for graphs with external data, on the graph's path
    (the checker then verifies the external references without loading the weights)."""
    try:
        onnx.checker.check_model(str(model) if isinstance(model, (str, os.PathLike)) else model, full_check=True)
    except Exception as e:  # onnx raises ValidationError / InferenceError
        raise SejdError(f"exported {what} failed onnx.checker (full_check): {e}") from None


def export_bundle(source, out: str | os.PathLike, variants=None, unroll: int = DEFAULT_UNROLL,
                  opset: int = DEFAULT_OPSET, batch_max: int = 64, force: bool = False, show_progress: bool = True,
                  config=None):
    """`config`: the model's config (TarFlowConfig or dict) for a checkpoint whose file name does not
    carry it, as `load_checkpoint(config=...)`."""
    unknown = sorted(set(variants or ()) - set(ALL_VARIANTS))
    if unknown:
        raise SejdError(f"unknown variants {unknown}; expected a subset of {list(VARIANTS)} (TarFlow) or "
                        f"{list(STARFLOW_VARIANTS)} (STARFlow)")
    # the bounds a bundle's manifest is held to at load (sejd.export.bundle), refused here before any work
    for name, value, lo, hi in (("unroll", unroll, 1, UNROLL_MAX), ("batch_max", batch_max, 1, BATCH_MAX_LIMIT),
                                ("opset", opset, OPSETS.start, OPSETS.stop - 1)):
        if not int_in(value, lo, hi):
            raise SejdError(f"{name} must be an int from {lo} to {hi}, got {value!r}")
    out = Path(out)
    if out.exists() or out.is_symlink():
        replace_only_ours("-o", out, force, "a sejd bundle whose manifest verifies", replaceable_bundle)
    model = load_model_source(source, config)
    cfg = model.config
    starflow = is_starflow(cfg)
    supported, default = family_variants(cfg)
    if variants is not None and set(variants) == set(VARIANTS) and starflow:  # `--variants all`
        variants = STARFLOW_VARIANTS
    variants = list(variants or default)
    refused = [v for v in variants if v not in supported]
    if refused:
        family = "STARFlow" if starflow else "TarFlow"
        raise SejdError(f"variants {refused} are not exported for {family} models; {family} bundles have "
                        f"{', '.join(supported)}")
    if unroll > cfg.num_tokens - 1:  # T-1 Jacobi iterations are always exact: never unroll more
        raise SejdError(f"unroll must be at most T-1 = {cfg.num_tokens - 1} for this model, got {unroll}")
    in_memory = source is model  # a model object, not a file
    source_name = f"<{type(model).__name__} in memory>" if in_memory else str(source)
    source_path = Path(source_name) if not in_memory and not source_name.startswith("builtin:") else None
    # the old bundle (if any) is replaced only by a verified new one, and only with --force: a target that
    # appears meanwhile makes the final move fail (atomic_dir re-checks at the moment of the move)
    with atomic_dir(out, replace=is_replaceable_bundle if force else None) as tmp:
        save_checkpoint(model, tmp / "model", **model.meta)
        graphs, written = _export_graphs(model, tmp, variants, unroll, opset, show_progress)
        files = {f.relative_to(tmp).as_posix(): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        manifest = {
            "schema": SCHEMA_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            **({"family": "starflow", "note": STARFLOW_NOTE} if starflow else {}),
            "config": cfg.to_dict(),
            "noise_std": model.noise_std,
            "source": {"name": source_name,
                       "sha256": (sha256_file(source_path) if source_path and source_path.is_file()
                                  else files["model/model.safetensors"])},
            "opset": opset, "unroll": unroll, "batch_max": batch_max,
            "graphs": graphs, "files": files, "weights": written,
        }
        if "geometry" in model.meta:  # where patch size and channels came from (file name, --config, shapes)
            manifest["geometry"] = model.meta["geometry"]
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        load_bundle(tmp)  # verify what was written before it becomes visible
    return load_bundle(out, verify=False)  # just verified: hashing the weights again would re-read gigabytes


def load_model_source(source, config=None):
    """The model to export: a TarFlow or StarFlow model itself, an ml-starflow checkpoint (or one with STARFlow
    Model kwargs in `config`), sejd's format of either (a folder with config.json and model.safetensors), or
    anything `load_checkpoint` reads."""
    import torch

    if isinstance(source, torch.nn.Module):
        return source
    from sejd.model.starflow_checkpoint import is_starflow_checkpoint, load_starflow

    folder = Path(str(source))
    if not str(source).startswith("builtin:") and folder.is_dir() and (folder / "config.json").is_file() \
            and (folder / "model.safetensors").is_file():
        try:
            meta = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            meta = None  # the TarFlow loader says what is wrong with it
        stated = meta.get("config") if isinstance(meta, dict) else None
        if isinstance(stated, dict) and is_starflow_checkpoint(folder, stated):
            model = load_starflow(folder / "model.safetensors", config={**stated, **(config or {})})
            model.noise_std = float(meta.get("noise_std", 0.0) or 0.0)
            return model
    if is_starflow_checkpoint(source, config):
        # mapped: the tensors stay in the file, in its dtype; each graph's are converted as they are written
        return load_starflow(source, config=config, mapped=True)
    return load_checkpoint(source, config=config)


def _export_graphs(model, root: Path, variants, unroll: int, opset: int, show_progress: bool):
    """Every graph, streamed block by block into `root` (see GraphWriter): memory holds the model and one
    graph at a time. Returns the manifest's graph entries and what was written."""
    cfg = model.config
    jobs = [(k, v) for k in range(cfg.num_blocks) for v in block_variants(cfg, k, variants)]
    jobs += [(None, v) for v in variants if v in MODEL_VARIANTS]
    graphs = []
    bar = progress(jobs, desc="export", enabled=show_progress)
    with WeightStore(root) as store:
        writer = GraphWriter(model, unroll, opset, store)
        for k, v in bar:
            rel = "forward.onnx" if k is None else f"blocks/{k}/{v}.onnx"
            writer.write(k, v, rel)
            c = contract(cfg, v, unroll, block=k)
            graphs.append({"block": k, "variant": v, "file": rel, "sha256": sha256_file(root / rel),
                           "inputs": [s.to_dict() for s in c.inputs], "outputs": [s.to_dict() for s in c.outputs],
                           "atol": c.atol})
            if show_progress:
                bar.set_postfix_str(f"{_mb(store.bytes_written)} weights written")
    written = {"weight_files": store.files(), "weight_bytes": store.bytes_written,
               "deduplicated_bytes": store.bytes_deduplicated, "inline_max_bytes": INLINE_MAX_BYTES,
               "graph_bytes": sum((root / g["file"]).stat().st_size for g in graphs),
               "graphs_traced": writer.traced, "graphs_retargeted": writer.retargeted}
    if show_progress:
        print(f"export: {len(graphs)} graphs ({writer.traced} traced, {writer.retargeted} re-targeted from block 0's), "
              f"{_mb(written['graph_bytes'])} of topology, {_mb(store.bytes_written)} "
              f"of weights in {len(written['weight_files'])} shared files ({_mb(store.bytes_deduplicated)} "
              f"of equal tensors stored once)", file=sys.stderr)
    return graphs, written


class GraphWriter:
    """Writes a model's graphs into a WeightStore, block by block: each graph's weights go to its block's
    weight file, its topology is saved and the full checker run on the file. A variant is traced for
    blocks 0 and 1 only; when block 0's graph re-targeted to block 1's tensors equals block 1's traced
    graph byte for byte (see weights.Retarget), the other blocks' graphs are re-targeted, else traced too.
    The whole-model `forward` graph is never traced at once: each block's forward body is made the same
    way (its tensors in that block's file) and the bodies are chained (loops.forward_chain), so memory
    holds the model and one block's graph at a time at any model size.
    `dtype`: reduced-precision block graphs (the forward graph is always fp32)."""

    def __init__(self, model, unroll: int, opset: int, store: WeightStore, dtype=None):
        self.model, self.unroll, self.opset, self.store, self.dtype = model, unroll, opset, store, dtype
        # per (variant, block group): blocks of one group have one topology (TarFlow: every block; STARFlow:
        # the blocks of one BlockSpec, its depth and text differing between blocks)
        self.templates: dict[tuple, Retarget | None] = {}
        self.seen: dict[tuple, list[int]] = {}
        self.traced = self.retargeted = 0
        self._named: tuple = (None, None)

    def write(self, k: int | None, variant: str, rel: str) -> Path:
        if k is None:
            model = self._forward(rel)
        else:
            model = self._block_graph(k, variant, rel)
        path = save_topology(model, self.store.root / rel)
        what = "the forward graph" if k is None else f"{variant} of block {k}"
        check_onnx(path, what if self.dtype is None else f"{self.dtype} {what}")
        return path

    def _forward(self, rel: str):
        cfg = self.model.config
        bodies = ((self._block_graph(k, FORWARD_BODY, rel), block.flip) for k, block in enumerate(self.model.blocks))
        return forward_chain(bodies, contract(cfg, "forward"), cfg, self.opset)

    def _block_graph(self, k: int, variant: str, rel: str):
        """Block k's graph of `variant`, re-targeted or traced, its tensors moved into block k's weight
        file (referenced relative to where `rel` will be saved)."""
        self.store.target(f"blocks/{k}/{WEIGHTS_FILE}")
        key = (variant, self.group(k))
        seen = self.seen.setdefault(key, [])
        if k not in seen:
            seen.append(k)
        order = seen.index(k)  # 0: the group's template, 1: the block that confirms it, 2..: re-targeted
        if self.lean(k):  # traced with placeholders; a template would hold the block's weights in float32
            self.traced += 1
            return self._trace(k, variant, rel, key, order, lean=True)
        template = self.templates.get(key) if order >= 2 else None
        model = template.graph(self.named(k)) if template else None
        if model is None:
            self.traced += 1
            return self._trace(k, variant, rel, key, order)
        self.retargeted += 1
        externalize(model, rel, self.store)
        return model

    def lean(self, k: int) -> bool:
        """Whether block k is traced lean (sejd.export.lean): a STARFlow block too large to copy, in float32."""
        import torch

        from sejd.export import lean

        return (is_starflow(self.model.config) and self.dtype in (None, torch.float32)
                and lean.float32_bytes(self.model.blocks[k]) > lean.LEAN_BLOCK_BYTES)

    def group(self, k: int):
        """Which blocks share one graph topology: TarFlow's all do; a STARFlow block's is its BlockSpec."""
        return self.model.blocks[k].spec if is_starflow(self.model.config) else None

    def named(self, k: int) -> dict:
        """The exported module's tensors for block k (one block held at a time: export streams blocks)."""
        if self._named[0] != k:
            import torch

            from sejd.export.graphs import BlockGraph

            self._named = (None, None)  # the previous block's tensors go before the next are made
            if is_starflow(self.model.config):
                from sejd.export.starflow_graphs import StarGraph

                module = StarGraph(self.model.blocks[k], self.dtype or torch.float32)
            else:
                module = BlockGraph(self.model.blocks[k], self.model.config.num_tokens, self.dtype or torch.float32)
            self._named = (k, dict(module.state_dict()))
        return self._named[1]

    def _trace(self, k, variant, rel, key=None, order=None, lean=False):
        """Trace through a scratch folder beside the graphs (removed also on failure); `lean`: with the block's
        weights swapped for placeholders, the real ones read one at a time as the graph's tensors are written."""
        key = (variant, self.group(k)) if key is None else key
        order = k if order is None else order
        import torch

        from sejd.export.lean import placeholders

        scratch = self.store.root / ".scratch"
        scratch.mkdir(parents=True)
        sources: dict = {}
        try:
            with placeholders(self.model.blocks[k]) if lean else contextlib.nullcontext():
                model = export_block_variant(self.model, k, variant, self.unroll, self.opset,
                                             self.dtype or torch.float32, scratch, sources)
            if order == 1 and self.templates.get(key) and not lean:
                if not self.templates[key].confirm(model, scratch, self.named(k), own=True):
                    self.templates[key] = None
            externalize(model, rel, self.store, base_dir=scratch, own=True, sources=sources)
        finally:
            shutil.rmtree(scratch)
        if order == 0 and not lean:
            self.templates[key] = Retarget(model, (self.store.root / rel).parent, self.named(k))
        return model


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _versions() -> dict:
    import torch

    try:  # export itself needs no ONNX Runtime (the `cpu` or `gpu` extra)
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {"sejd": VERSION, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort_version}


__all__ = ["export_bundle", "BundleError"]
