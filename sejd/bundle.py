"""The bundle: a folder holding a model's ONNX graphs, its weights and a manifest that pins them.

    manifest.json                  schema, config, versions, opset, source sha256, graphs, file hashes
    model/model.safetensors        the PyTorch reference (sejd format): parity checks, denoising
    model/config.json
    blocks/<k>/<variant>.onnx      per-block graphs
    forward.onnx                   the whole model's forward pass
    engines/<backend>/...          built by `sejd build` (their own manifest pins the bundle's)
    plan.json                      written by `sejd tune` (pins the bundle's manifest hash): the latest
    plans/batch-<N>.json           every tuned plan by the batch size it was tuned for

Loading verifies the schema version and the sha256 of every listed file, and refuses a changed,
missing or foreign file by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from sejd.errors import SejdError
from sejd.model.tarflow import TarFlowConfig

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
UNPINNED_TOP = ("engines", "plan.json", "plans", MANIFEST)  # written after export, verified by their own means


class BundleError(SejdError):
    """A bundle is missing, tampered with, or from an incompatible version."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def config(self) -> TarFlowConfig:
        return TarFlowConfig.from_dict(self.manifest["config"])

    @property
    def manifest_sha256(self) -> str:
        return sha256_file(self.path / MANIFEST)

    @property
    def unroll(self) -> int:
        return int(self.manifest["unroll"])

    def graph(self, variant: str, block: int | None = None) -> dict:
        for g in self.manifest["graphs"]:
            if g["variant"] == variant and g["block"] == block:
                return g
        where = "the model" if block is None else f"block {block}"
        raise BundleError(f"{self.path}: no {variant!r} graph for {where}; exported variants: "
                          f"{sorted({g['variant'] for g in self.manifest['graphs']})} "
                          f"(re-export with --variants including {variant})")

    def variants(self) -> list[str]:
        return sorted({g["variant"] for g in self.manifest["graphs"]})

    def graph_path(self, variant: str, block: int | None = None) -> Path:
        return self.path / self.graph(variant, block)["file"]

    def load_model(self):
        from sejd.model.checkpoint import load_checkpoint

        return load_checkpoint(self.path / "model")


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    path = Path(path)
    mf = path / MANIFEST
    if not mf.exists():
        raise BundleError(f"{path} is not a sejd bundle: {MANIFEST} is missing (create one with `sejd export`)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf}: not valid JSON ({e})") from None
    schema = manifest.get("schema") if isinstance(manifest, dict) else None
    if schema != SCHEMA_VERSION:
        raise BundleError(f"{path}: bundle schema version {schema!r}, this sejd reads version {SCHEMA_VERSION}; "
                          f"re-export it with this sejd (`sejd export`)")
    bundle = Bundle(path, manifest)
    if verify:
        verify_files(bundle)
    return bundle


def verify_files(bundle: Bundle) -> None:
    files: dict = bundle.manifest["files"]
    for rel, digest in files.items():
        f = bundle.path / rel
        if not f.exists():
            raise BundleError(f"{bundle.path}: file {rel} listed in the manifest is missing")
        if sha256_file(f) != digest:
            raise BundleError(f"{bundle.path}: file {rel} has changed since export (sha256 mismatch); "
                              f"re-export the bundle")
    for f in sorted(bundle.path.rglob("*")):
        rel = f.relative_to(bundle.path).as_posix()
        if f.is_file() and rel not in files and rel.split("/")[0] not in UNPINNED_TOP:
            raise BundleError(f"{bundle.path}: foreign file {rel} is not part of this bundle's manifest")
