"""One rule for every path a command writes, applied at the top of each command before any work.

Each output is resolved (links followed, `..` removed) and refused, in one line naming both paths, when it
- is, contains or lies inside an input the command reads (checkpoint, bundle, plan or config file), except
  where the command writes inside its input by design (`sejd tune`'s plan.json and plans/ in the bundle);
- is the same file as another output of the command, or one lies inside the other;
- cannot be written: a file output that names a folder, a folder output that names a file, or a place
  where a file cannot be created (tried, not guessed from permission bits).

Replacing a folder takes `--force`, and `--force` replaces only what sejd itself wrote (`replace_only_ours`,
each command saying what that is: export, export-triton, train); files (`--json`, `--npy`, `--out`, `--plot`,
plan files) are replaced atomically, but never when they name an input.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from sejd.core.errors import SejdError


@dataclasses.dataclass(frozen=True)
class Input:
    """Something the command reads: named in errors as `what` (e.g. "the bundle", "--plan")."""

    what: str
    path: Path
    writes_inside: tuple[str, ...] = ()  # places inside it the command itself writes, relative to it


@dataclasses.dataclass(frozen=True)
class Output:
    """A path the command writes. `kind`: "file" (written atomically beside itself), "into" (a folder files
    are written into) or "folder" (a folder built beside it and moved into place)."""

    option: str
    path: Path
    kind: str = "file"


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _under(inner: Path, outer: Path) -> bool:
    return outer in inner.parents


def source_inputs(source, what: str | None = None) -> list[Input]:
    """What opening `source` reads: a bundle or checkpoint folder, a checkpoint file (sejd's NAME.safetensors
    + NAME.json pair: both), or a shipped model. `builtin:NAME` must name a shipped model: anything else is
    refused here, before any model is loaded."""
    text = str(source)
    if text.startswith("builtin:"):
        from sejd.model.checkpoint import BUILTIN_DIR, builtin_names

        name = text[len("builtin:"):]
        if name not in builtin_names():
            raise SejdError(f"unknown builtin model {name!r}; available: {builtin_names() or 'none'}")
        return [Input(what or "the shipped model", BUILTIN_DIR / name)]
    path = Path(text)
    if (path / "manifest.json").exists() or (path / "manifest.json").is_symlink():
        return [Input(what or "the bundle", path)]
    if path.suffix in (".safetensors", ".json") and not path.is_dir():
        return [Input(what or "the checkpoint", path.with_suffix(s)) for s in (".safetensors", ".json")]
    return [Input(what or "the checkpoint", path)]


def file_input(what: str, value) -> list[Input]:
    """An option naming a file the command reads (`--plan`, `--config`), when it names an existing path."""
    if value is None or str(value).startswith("builtin:"):
        return []
    path = Path(str(value))
    try:
        return [Input(what, path)] if (path.exists() or path.is_symlink()) else []
    except OSError:  # not a path at all (inline JSON longer than a file name may be)
        return []


def check_outputs(inputs: list[Input], outputs: list[Output]) -> None:
    """Refuse (SejdError, one line) every output that would overwrite an input or another output, or that
    cannot be written; see the module docstring. Outputs whose path is None are not written."""
    outputs = [o for o in outputs if o.path is not None]
    real_inputs = [(i, _real(i.path)) for i in inputs if i.path is not None]
    real_outputs = [(o, _real(o.path)) for o in outputs]
    for o, out in real_outputs:
        for i, inp in real_inputs:
            if out == inp:
                raise SejdError(f"{o.option} {o.path} is {i.what} {i.path}, which this command reads; "
                                f"choose another path")
            if _under(out, inp) and not any(out == _real(inp / w) or _under(out, _real(inp / w))
                                            for w in i.writes_inside):
                raise SejdError(f"{o.option} {o.path} lies inside {i.what} {i.path}, which this command reads; "
                                f"choose a path outside it")
            if _under(inp, out):
                raise SejdError(f"{o.option} {o.path} contains {i.what} {i.path}, which this command reads; "
                                f"choose a path that does not hold it")
    for k, (a, ra) in enumerate(real_outputs):
        for b, rb in real_outputs[k + 1:]:
            if ra == rb:
                raise SejdError(f"{a.option} {a.path} and {b.option} {b.path} are the same file; give each "
                                f"output its own path")
            if _under(ra, rb) or _under(rb, ra):
                inner, outer = (a, b) if _under(ra, rb) else (b, a)
                raise SejdError(f"{inner.option} {inner.path} lies inside {outer.option} {outer.path}; give each "
                                f"output its own path")
    for o in outputs:
        _writable(o)


def _writable(o: Output) -> None:
    from sejd.core.files import probe_writable

    path = Path(o.path)
    if o.kind == "file" and path.is_dir():
        raise SejdError(f"{o.option}: cannot write {path}: it is a directory; expected a file name")
    if o.kind == "into" and path.exists() and not path.is_dir():
        raise SejdError(f"{o.option}: cannot write into {path}: it is a file; expected a folder")
    if o.kind == "into" and path.is_dir():
        folder = path
    else:  # written beside itself (a temporary file or scratch folder): the nearest existing folder above
        folder = next(p for p in path.absolute().parents if p.exists() or p.is_symlink())
        if not folder.is_dir():
            raise SejdError(f"{o.option}: cannot write {path}: {folder} is not a folder")
    reason = probe_writable(folder)
    if reason is not None:
        raise SejdError(f"{o.option}: cannot write {path}: {folder} is not a writable folder ({reason})")


def replace_only_ours(option: str, path: Path, force: bool, ours: str, not_ours, present: str = "exists") -> None:
    """Refuse (before any work) to replace `path` unless `force` is given and `not_ours(path)` finds nothing
    wrong with it, i.e. sejd wrote it. `ours` says what --force replaces, `present` what is there."""
    if not force:
        raise SejdError(f"{option} {path} {present}; pass --force to replace it (only {ours})")
    why = not_ours(path)
    if why:
        raise SejdError(f"{option} {path} {present} and is not {ours} ({why}), so --force does not replace it; "
                        f"remove it yourself or choose another {option}")
