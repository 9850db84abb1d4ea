"""The bundle: a folder holding a model's ONNX graphs, its weights and a manifest that pins them.

    manifest.json                  schema, config, versions, opset, source sha256, graphs, file hashes
    model/model.safetensors        the PyTorch reference (sejd format): parity checks, denoising
    model/config.json
    blocks/<k>/<variant>.onnx      per-block graphs (topology; tensors <= 1 KiB inline)
    blocks/<k>/weights.bin         the block's weights, stored once, shared by its graphs (ONNX external data)
    forward.onnx                   the whole model's forward pass, chained from per-block forward graphs
                                   (its tensors in the block weight files)
    engines/<backend>/...          built by `sejd build` (their own manifest pins the bundle's)
    plan.json                      written by `sejd tune` (pins the bundle's manifest hash): the latest
    plans/batch-<N>.json           every tuned plan by the batch size it was tuned for

Loading checks the manifest's schema, then confines every path a manifest names (`confined_file`),
compares the manifest's config with model/config.json, refuses symlinks that leave the bundle, and
verifies the sha256 of every listed file, refusing a changed, missing or foreign file by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import stat
from pathlib import Path

from sejd.core.errors import SejdError
from sejd.core.files import read_json
from sejd.model.tarflow import TarFlowConfig

SCHEMA_VERSION = 2
# what each older schema lacks, said when one is refused (a bundle is re-exported, never converted)
SCHEMA_CHANGES = {1: "the single-token graphs step and step_kv are now step_present and step_rows"}
MANIFEST = "manifest.json"
UNPINNED_TOP = ("engines", "plan.json", "plans", MANIFEST)  # written after export, verified by their own means
MODEL_CONFIG = "model/config.json"
OPSETS = range(17, 22)  # the opsets `sejd export` writes
UNROLL_MAX = 1024  # jacobi_k iterations per call: T - 1 are exact, and no published model has T > 1024
BATCH_MAX_LIMIT = 4096  # a manifest's batch_max beyond this is corrupt, not a model anyone serves
PATH_RULE = "a manifest names only regular files inside the bundle, by relative, normalised POSIX paths"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DRIVE = re.compile(r"[A-Za-z]:")


class BundleError(SejdError):
    """A bundle is missing, tampered with, or from an incompatible version."""


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a regular file; anything else (a FIFO would block the read) is a BundleError."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"{path} is not a regular file; {PATH_RULE}")
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def family(self) -> str:
        """"tarflow", or "starflow" for a StarFlow model's bundle (the manifest's `family`)."""
        return self.manifest.get("family", "tarflow")

    @property
    def config(self) -> TarFlowConfig:
        """The model's config: a TarFlowConfig, or a StarFlowConfig for a STARFlow bundle."""
        return config_of(self.manifest["config"], self.family)

    @property
    def batch_max(self) -> int:
        """The largest batch the bundle's engines serve (checked to be an int in range at load)."""
        return self.manifest["batch_max"]

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
        rel = self.graph(variant, block)["file"]
        return confined_file(self.path, rel, f"the {variant} graph's file", self.path / MANIFEST,
                             self.manifest["files"])

    def load_model(self):
        if self.family == "starflow":
            from sejd.model.starflow_checkpoint import load_starflow

            weights = confined_file(self.path, "model/model.safetensors", "the PyTorch reference's weights",
                                    self.path / MANIFEST, self.manifest["files"])
            model = load_starflow(weights, config=self.config)
            model.noise_std = float(self.manifest.get("noise_std", 0.0) or 0.0)
            return model
        from sejd.model.checkpoint import load_checkpoint

        return load_checkpoint(self.path / "model")


FAMILIES = ("tarflow", "starflow")


def config_of(stated: dict, family: str = "tarflow"):
    """A manifest's config dict as its family's config class (ConfigError when it is not one)."""
    if family == "starflow":
        from sejd.model.starflow import StarFlowConfig

        return StarFlowConfig.from_dict(stated)
    return TarFlowConfig.from_dict(stated)


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Open a bundle; its manifest is checked before anything in it is used. `verify`: also walk the folder
    (symlinks, foreign files) and hash every listed file."""
    path = Path(path)
    mf = path / MANIFEST
    if not (mf.exists() or mf.is_symlink()):
        raise BundleError(f"{path} is not a sejd bundle: {MANIFEST} is missing (create one with `sejd export`)")
    manifest = read_json_object(mf, "the bundle manifest", root=path)
    schema = manifest.get("schema")
    if schema != SCHEMA_VERSION:
        change = SCHEMA_CHANGES.get(schema) if type(schema) is int else None  # not a list, not a bool
        raise BundleError(f"{path}: bundle schema version {schema!r}, this sejd reads version {SCHEMA_VERSION}"
                          f"{f' ({change})' if change else ''}; re-export it with this sejd "
                          f"(`sejd export {path / 'model'} -o NEW_BUNDLE`: the bundle's model/ is a checkpoint)")
    validate_manifest(manifest, mf)
    bundle = Bundle(path, manifest)
    if verify:
        refuse_escaping_symlinks(path, manifest["files"], mf)  # before any file is opened through one
        refuse_shared_graph_files(path, manifest, mf)
    check_model_config(bundle)
    if verify:
        verify_files(bundle)
    return bundle


def read_json_object(path: Path, what: str, root: Path | None = None) -> dict:
    """A JSON object from `path` (a manifest): a regular file of at most `JSON_MAX_BYTES` (a FIFO or device is
    refused, never waited on), inside `root` when given; anything else is a BundleError naming the file."""
    data = read_json(path, what, BundleError, root)
    if not isinstance(data, dict):
        raise BundleError(f"{path}: {what} must be a JSON object, got {_kind(data)}")
    return data


def _kind(value) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an int", float: "a number",
             type(None): "null"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def path_rule_broken(rel) -> str | None:
    """Which part of the path rule the manifest path `rel` breaks (None: a relative, normalised POSIX path)."""
    if not isinstance(rel, str):
        return f"is {_kind(rel)}, not a path string"
    if not rel:
        return "is empty"
    if "\\" in rel:
        return "contains a backslash (paths are POSIX, '/'-separated)"
    if "\0" in rel:
        return "contains a NUL byte"
    if rel.startswith("/"):
        return "is absolute"
    if _DRIVE.match(rel):
        return "names a drive"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return "is not normalised (it has an empty, '.' or '..' segment)"
    return None


def _inside(real: Path, root_real: Path) -> bool:
    return real == root_real or root_real in real.parents


def confined_file(root: Path, rel, field: str, where, listed=None, remedy: str = "re-export the bundle") -> Path:
    """root/rel, where `rel` is a path that manifest `where` names in `field`: refused (BundleError naming the
    field, the path and the rule) unless it is a relative, normalised POSIX path, listed in `listed` (the
    manifest's `files`, when given), and resolves (following symlinks) to a regular file inside `root`."""
    check_path(rel, field, where, listed)
    path = root / rel
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        listed_there = "listed in the manifest " if listed is not None else ""
        raise BundleError(f"{where}: {field} {rel} {listed_there}is missing; {remedy}") from None
    except (OSError, RuntimeError) as e:  # a symlink loop, a component that is not a folder
        raise BundleError(f"{where}: {field} {rel} cannot be resolved ({e}); {PATH_RULE}") from None
    if not _inside(real, root.resolve()):
        raise BundleError(f"{where}: {field} {rel} resolves to {real}, outside {root}; {PATH_RULE}")
    if not real.is_file():
        raise BundleError(f"{where}: {field} {rel} is not a regular file; {PATH_RULE}")
    return path


def check_path(rel, field: str, where, listed=None) -> None:
    """The syntax half of the path rule (see `confined_file`), and, given `listed`, that `rel` is a key of it."""
    broken = path_rule_broken(rel)
    if broken:
        raise BundleError(f"{where}: {field} {rel!r} {broken}; {PATH_RULE}")
    if listed is not None and rel not in listed:
        raise BundleError(f"{where}: {field} {rel} is not listed in the manifest's files (every file a bundle "
                          f"uses is listed there with its sha256)")


def check_file_table(manifest: dict, where, field: str = "files") -> dict:
    """manifest[field]: an object mapping each path (checked by `path_rule_broken`) to its sha256."""
    if field not in manifest:
        raise BundleError(f"{where}: no {field} table (every file is listed there with its sha256)")
    files = manifest[field]
    if not isinstance(files, dict):
        raise BundleError(f"{where}: {field} must be an object mapping each file to its sha256, got {_kind(files)}")
    for rel, digest in files.items():
        check_path(rel, f"{field} entry", where)
        if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise BundleError(f"{where}: {field} entry {rel}: expected a sha256 (64 lowercase hex digits), "
                              f"got {digest!r}")
    return files


def int_in(value, lo: int, hi: int) -> bool:
    """An int (not a bool) from lo to hi: the rule for the manifest's unroll, batch_max and opset."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _int_in(manifest: dict, key: str, lo: int, hi: int, where) -> None:
    value = manifest.get(key)
    if not int_in(value, lo, hi):
        raise BundleError(f"{where}: {key} must be an int from {lo} to {hi}, got {value!r}")


def validate_manifest(manifest: dict, where) -> None:
    """The manifest's schema, before any of it is used: O(entries), opens no file."""
    files = check_file_table(manifest, where)
    stated = _object(manifest.get("config"), "config", where)
    family = manifest.get("family", "tarflow")
    if family not in FAMILIES:
        raise BundleError(f"{where}: family must be one of {list(FAMILIES)}, got {str(family)[:40]!r}")
    try:
        config = config_of(stated, family)
    except SejdError as e:
        raise BundleError(f"{where}: config: {e}") from None
    _int_in(manifest, "unroll", 1, UNROLL_MAX, where)
    _int_in(manifest, "batch_max", 1, BATCH_MAX_LIMIT, where)
    _int_in(manifest, "opset", OPSETS.start, OPSETS.stop - 1, where)
    graphs = manifest.get("graphs")
    if not isinstance(graphs, list):
        raise BundleError(f"{where}: graphs must be a list of graph entries, got {_kind(graphs)}")
    seen = set()
    for i, g in enumerate(graphs):
        g = _object(g, f"graphs[{i}]", where)
        block = g.get("block")
        if block is not None and (not isinstance(block, int) or isinstance(block, bool)
                                  or not 0 <= block < config.num_blocks):
            raise BundleError(f"{where}: graphs[{i}].block must be null (the whole model) or a block index from 0 "
                              f"to {config.num_blocks - 1}, got {block!r}")
        if not isinstance(g.get("variant"), str):
            raise BundleError(f"{where}: graphs[{i}].variant must be a string, got {g.get('variant')!r}")
        if (block, g["variant"]) in seen:
            raise BundleError(f"{where}: graphs[{i}] repeats the {g['variant']!r} graph of "
                              f"{'the model' if block is None else f'block {block}'}")
        seen.add((block, g["variant"]))
        check_path(g.get("file"), f"graphs[{i}].file", where, files)
        own = graph_file(g["variant"], block)
        if g["file"] != own:  # e.g. another graph's file: its inputs are not this variant's
            raise BundleError(f"{where}: graphs[{i}].file must be {own} (the {g['variant']} graph's own file), "
                              f"got {g['file']}")


def graph_file(variant: str, block: int | None) -> str:
    """Where `sejd export` writes a graph: blocks/K/VARIANT.onnx, or VARIANT.onnx for the whole model."""
    return f"{variant}.onnx" if block is None else f"blocks/{block}/{variant}.onnx"


def _object(value, field: str, where) -> dict:
    if not isinstance(value, dict):
        raise BundleError(f"{where}: {field} must be an object, got {_kind(value)}")
    return value


def check_model_config(bundle: Bundle) -> None:
    """The manifest's config must be the config of model/ (the PyTorch reference): compares the two JSON
    configs, without loading any weights."""
    where = bundle.path / MANIFEST
    path = confined_file(bundle.path, MODEL_CONFIG, "the PyTorch reference's config", where,
                         bundle.manifest["files"])
    meta = read_json_object(path, "the PyTorch reference's config", root=bundle.path)
    reference = _object(meta.get("config"), "config", path)
    try:
        reference = config_of(reference, bundle.family).to_dict()
    except SejdError as e:
        raise BundleError(f"{path}: config: {e}") from None
    stated = bundle.config.to_dict()
    differ = [k for k in stated if stated[k] != reference[k]]
    if differ:
        raise BundleError(f"{where}: config contradicts {MODEL_CONFIG} (the bundle's PyTorch reference) in "
                          f"{', '.join(f'{k} ({stated[k]!r} vs {reference[k]!r})' for k in differ)}; "
                          f"re-export the bundle")


def refuse_escaping_symlinks(root: Path, files: dict, where) -> None:
    """Walk the bundle without following links: a symlink (to a file or a folder) must resolve inside it;
    a dangling one is refused. Any other entry must be listed in `files` or sit in an unpinned place."""
    root_real = root.resolve()
    for folder, dirs, names in os.walk(root):
        for name, is_file in [(d, False) for d in dirs] + [(n, True) for n in names]:
            entry = Path(folder) / name
            rel = entry.relative_to(root).as_posix()
            if entry.is_symlink():
                try:
                    real = entry.resolve(strict=True)
                except (OSError, RuntimeError):
                    raise BundleError(f"{where}: symlink {rel} is dangling (its target {os.readlink(entry)!r} does "
                                      f"not exist or loops); {PATH_RULE}") from None
                if not _inside(real, root_real):
                    raise BundleError(f"{where}: symlink {rel} resolves to {real}, outside {root}; {PATH_RULE}")
            if is_file and rel not in files and rel.split("/")[0] not in UNPINNED_TOP:
                raise BundleError(f"{root}: foreign file {rel} is not part of this bundle's manifest")


def refuse_shared_graph_files(root: Path, manifest: dict, where) -> None:
    """Each graph entry's file is its own (`graph_file`); a link may not make it another graph's file, whose
    inputs and outputs are another variant's (or another block's weights)."""
    seen = {}
    for g in manifest["graphs"]:
        try:
            real = (root / g["file"]).resolve(strict=True)
        except (OSError, RuntimeError):
            continue  # missing or looping: refused by name when the files are verified
        other = seen.setdefault(real, g["file"])
        if other != g["file"]:
            raise BundleError(f"{where}: graph file {g['file']} is a link to {other}, another graph's file; "
                              f"{PATH_RULE}")


def verify_files(bundle: Bundle) -> None:
    """Every file in the manifest's `files` table, whatever its kind, confined and unchanged (sha256)."""
    where = bundle.path / MANIFEST
    files = bundle.manifest["files"]
    for rel, digest in files.items():
        f = confined_file(bundle.path, rel, "file", where, files)
        if sha256_file(f) != digest:
            raise BundleError(f"{bundle.path}: file {rel} has changed since export (sha256 mismatch); "
                              f"re-export the bundle")


def replaceable_bundle(path: Path, verify: bool = True) -> str | None:
    """None when `path` is a bundle sejd wrote (what `sejd export --force` may replace): a real folder (not a
    link) whose manifest is valid and holds no file the manifest does not account for, every listed file
    unchanged (`verify`); else why it is not one."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return "not a folder" if not path.is_symlink() else "a symbolic link"
    if not (path / MANIFEST).exists():
        return f"no {MANIFEST}"
    try:
        manifest = read_json_object(path / MANIFEST, "its manifest", root=path)
        if manifest.get("schema") != SCHEMA_VERSION:
            return f"its {MANIFEST} is not a sejd bundle manifest of schema {SCHEMA_VERSION}"
        bundle = load_bundle(path, verify=verify)
        if not verify:  # load_bundle walks the folder only when it verifies
            refuse_escaping_symlinks(path, bundle.manifest["files"], path / MANIFEST)
    except SejdError as e:
        return str(e)
    return None


def is_replaceable_bundle(path: Path) -> bool:
    """The check made again at the final move of `sejd export --force` (the files were verified before)."""
    return replaceable_bundle(path, verify=False) is None


is_replaceable_bundle.__name__ = "a bundle whose manifest verifies"
