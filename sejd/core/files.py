"""Atomic writes into recognisable scratch folders.

Writes never leave a half-written result under the final name, and never touch what another process made:
- a result is built in a scratch folder `.sejd-tmp-NAME-XXXX` beside it, holding a marker file with the
  creating pid, its start time and the host; SIGTERM while it exists raises SystemExit, so the scratch is
  removed on the way out, and a later run beside the same target removes scratch folders whose process is
  gone (SIGKILL, power loss) and says so. A folder without the marker is never removed.
- the final move is `renameat2(RENAME_NOREPLACE)` (Linux): it fails if the target appeared meanwhile, with
  no window between check and move. Where the kernel or file system lacks it, `mkdir(target)` claims the
  name (it fails if anything is there) and `rename` then replaces that still-empty folder of ours.
- replacing is allowed only where the caller says what may be replaced (a predicate such as "a folder with
  manifest.json"); the old folder is moved into our scratch, checked there, and deleted with the scratch,
  so only what this process moved aside is ever deleted.
- an OSError while writing becomes a one-line SejdError naming the path and the OS's reason.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

from sejd.core.errors import SejdError

SCRATCH_PREFIX = ".sejd-tmp-"
SCRATCH_MARKER = ".sejd-scratch.json"  # {"tool": "sejd", "pid", "started", "host": name and PID namespace}


class WriteError(SejdError):
    """`cannot write PATH: REASON`: the file system refused a write (full, read-only, no permission)."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot write {path}: {reason}")
        self.path, self.reason = path, reason


def write_error(path, e: OSError) -> WriteError:
    """`cannot write PATH: REASON` for an OSError met while writing `path`."""
    reason = e.strerror or str(e)
    if isinstance(e.filename, (str, bytes)) and Path(os.fsdecode(e.filename)) != Path(path):
        reason += f" ({os.fsdecode(e.filename)})"
    return WriteError(path, reason)


# what a library reports, in its own exception type, when the OS refused a write (safetensors' SafetensorError
# "I/O error: No space left on device (os error 28)"): the user's disk, not a fault of sejd
_WRITE_FAULTS = tuple(os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG))


def library_write_fault(e: BaseException) -> str | None:
    """The OS's reason when `e`, raised by a library while writing, says the file system refused the write."""
    text = str(e)
    return next((reason for reason in _WRITE_FAULTS if reason in text), None)


@contextlib.contextmanager
def _reporting_write_errors(path):
    """OSErrors, and library errors carrying an OS write failure, become one WriteError naming `path` (also
    those of files written inside a folder that becomes `path`: the user knows the target, not our scratch)."""
    try:
        yield
    except OSError as e:
        raise write_error(path, e) from None
    except WriteError as e:
        raise WriteError(path, e.reason) from None
    except SejdError:
        raise
    except Exception as e:  # noqa: BLE001 - only those that carry an OS write failure are converted
        reason = library_write_fault(e)
        if reason is None:
            raise
        raise WriteError(path, reason) from None


@contextlib.contextmanager
def _new_parents(folder: Path):
    """Create `folder` and missing ancestors; remove the ones created here (if still empty) when the block fails."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    created = []
    try:
        for p in missing:
            with contextlib.suppress(FileExistsError):  # made by someone else meanwhile: not ours to remove
                p.mkdir()
                created.append(p)
        yield
    except BaseException:
        for p in reversed(created):
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


@contextlib.contextmanager
def _sigterm_raises():
    """While the block runs, SIGTERM raises SystemExit (status 143) so `finally` clauses clean up; the previous
    handler is restored after. Only the main thread can set handlers; an ignored SIGTERM stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous in (signal.SIG_IGN, None):  # None: set outside Python; leave it alone
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _sigterm_deferred():
    """Hold SIGTERM back while the block runs (cleanup must not be cut short); delivered after."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _process_start(pid: int | str = "self") -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _this_host() -> str:
    """The host name and PID namespace: pids in a marker can be checked only where both are the same."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()} {namespace}".strip()


def _process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return started is None or _process_start(pid) in (None, started)


def _is_stale_scratch(folder: Path) -> bool:
    """A scratch folder this tool made (marker present) whose process on this host is gone."""
    marker = folder / SCRATCH_MARKER
    try:
        if folder.is_symlink() or not folder.is_dir() or marker.is_symlink() or not marker.is_file():
            return False
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not (isinstance(info, dict) and info.get("tool") == "sejd" and isinstance(info.get("pid"), int)):
        return False
    if info.get("host") != _this_host():  # a process on another machine or in another container: unknowable
        return False
    if info["pid"] == os.getpid() and info.get("started") == _process_start():
        return False
    return not _process_alive(info["pid"], info.get("started"))


def remove_stale_scratch(parent: str | os.PathLike) -> list[Path]:
    """Remove the scratch folders in `parent` left by sejd runs that were killed; say so on stderr."""
    parent = Path(parent)
    try:
        candidates = sorted(p for p in parent.iterdir() if p.name.startswith(SCRATCH_PREFIX))
    except OSError:
        return []
    stale = [p for p in candidates if _is_stale_scratch(p)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        print(f"sejd: removed {len(stale)} scratch folder(s) left in {parent} by killed sejd runs: "
              f"{', '.join(p.name for p in stale)}", file=sys.stderr)
    return stale


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike, name: str):
    """A marked scratch folder `parent/.sejd-tmp-NAME-XXXX`, removed when the block ends, also on SIGTERM.
    Stale scratch folders of killed runs in `parent` are removed first."""
    parent = Path(parent)
    with _sigterm_raises():
        remove_stale_scratch(parent)
        tmp = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{name}-", dir=parent))
        try:
            (tmp / SCRATCH_MARKER).write_text(json.dumps({"tool": "sejd", "pid": os.getpid(),
                                                          "started": _process_start(),
                                                          "host": _this_host()}) + "\n")
            yield tmp
        finally:
            with _sigterm_deferred():
                shutil.rmtree(tmp, ignore_errors=True)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2_noreplace(src: Path, dst: Path) -> bool:
    """renameat2(RENAME_NOREPLACE); False where the C library, kernel or file system lacks it."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))  # EEXIST becomes FileExistsError


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the folder `src` to `dst`; FileExistsError if `dst` exists, decided atomically at the move."""
    src, dst = Path(src), Path(dst)
    if _renameat2_noreplace(src, dst):
        return
    os.mkdir(dst)  # claims the name: fails if anything is there
    try:
        os.rename(src, dst)  # replaces our empty folder; refuses it if someone wrote into it meanwhile
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(dst)  # only while still empty
        raise FileExistsError(errno.EEXIST, "changed while being claimed", str(dst)) from None


def folder_with(name: str) -> Callable[[Path], bool]:
    """A replace predicate: a real folder (not a link) holding the file `name`, e.g. a bundle's manifest.json."""
    def holds(path: Path) -> bool:
        return path.is_dir() and not path.is_symlink() and (path / name).is_file()

    holds.__name__ = f"folder_with_{name}"
    return holds


def output_file(path: str | os.PathLike) -> Path:
    """`path` as a file to write, or a one-line error if it names a directory or a place this user cannot
    write (the nearest existing parent folder decides; missing ones are created): check before long work."""
    path = Path(path)
    if path.is_dir():
        raise SejdError(f"cannot write {path}: it is a directory; expected a file name")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SejdError(f"cannot write {path}: {parent} is not a writable folder")
    return path


def probe_writable(folder: str | os.PathLike) -> str | None:
    """None when a file can be created in the existing folder `folder`, else the OS's reason. A real
    attempt (a probe file made and removed at once), because permission bits do not tell: root ignores
    them, and read-only mounts and /proc refuse regardless."""
    try:
        tmp = _exclusive_file(Path(folder), ".sejd-probe-", "")
    except OSError as e:
        return e.strerror or str(e)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return None


# bounds on what sejd reads whole into memory from a bundle, plan or checkpoint folder
JSON_MAX_BYTES = 64 << 20  # manifests (a published-size bundle's is ~100 KB), configs, plans


def read_regular(path: str | os.PathLike, what: str, limit: int, error=SejdError, root=None) -> bytes:
    """The bytes of `path`, refused (`error`, one line) unless it is a regular file of at most `limit`
    bytes. Opening never blocks (a FIFO or device is refused, not waited on). With `root`, the path must
    resolve inside `root` and the file is opened without following a link (no link out of it is read)."""
    path = Path(path)
    target = path
    if root is not None:
        try:
            target = path.resolve(strict=True)
        except FileNotFoundError:
            raise error(f"{path}: {what} does not exist") from None
        except (OSError, RuntimeError) as e:
            raise error(f"{path}: {what} cannot be resolved ({e})") from None
        root_real = Path(root).resolve()
        if target != root_real and root_real not in target.parents:
            raise error(f"{path}: {what} resolves to {target}, outside {root}")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if root is not None:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags)
    except FileNotFoundError:
        raise error(f"{path}: {what} does not exist") from None
    except OSError as e:
        raise error(f"{path}: {what} cannot be read: {e.strerror or e}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # checked before fdopen, which refuses a directory with its own error
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device)"
        raise error(f"{path}: {what} is {kind}; expected a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > limit:
            raise error(f"{path}: {what} is {st.st_size:,} bytes, more than the {limit:,} sejd reads")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{path}: {what} cannot be read: {e.strerror or e}") from None
    if len(data) > limit:  # grew while being read
        raise error(f"{path}: {what} is more than the {limit:,} bytes sejd reads")
    return data


def read_json(path: str | os.PathLike, what: str, error=SejdError, root=None, limit: int = JSON_MAX_BYTES):
    """JSON from a regular file (`read_regular`): text that is not UTF-8, not JSON or nested deeper than the
    parser's stack is refused with `error`, naming the file."""
    data = read_regular(path, what, limit, error, root)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # JSONDecodeError, and ints longer than Python converts
        raise error(f"{path}: {what} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{path}: {what} is nested too deeply to be read") from None


def _exclusive_file(folder: Path, prefix: str, suffix: str) -> Path:
    """A new empty file in `folder`, created with the user's umask (mkstemp would make it 0600)."""
    while True:
        tmp = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    Nothing half-written is ever visible under the final name; on failure (also SIGTERM) the temporary
    file is removed, and an OSError becomes a one-line SejdError naming `path`.
    """
    path = Path(path)
    with _reporting_write_errors(path), _sigterm_raises():
        output_file(path)
        with _new_parents(path.parent):
            tmp = _exclusive_file(path.parent, f".{path.name}.", ".tmp")
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
            try:
                yield str(tmp)
                if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that replaced the file (safetensors
                    os.chmod(tmp, mode)  # 0.8 writes a 0600 file and renames it) gets the user's umask back
                os.replace(tmp, path)
            finally:
                with _sigterm_deferred():
                    if os.path.lexists(tmp):
                        os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: Callable[[Path], bool] | None = None):
    """Yield a new folder, built inside a marked scratch folder beside `path`; moved to `path` only if the block
    succeeds. Without `replace`, the move fails if `path` exists by then (e.g. created by another process
    meanwhile). With it, an existing `path` is replaced only if `replace(path)` holds, also for what was moved
    aside; the old folder is deleted only after the new one is in place. New folders get the user's umask."""
    path = Path(path)
    with _reporting_write_errors(path), _new_parents(path.parent), scratch_dir(path.parent, path.name) as scratch:
        new = scratch / path.name
        new.mkdir()  # mode 0o777 & ~umask (the scratch itself is 0700 from mkdtemp)
        yield new
        _swap(new, path, replace, scratch / "replaced")


def _swap(new: Path, path: Path, replace: Callable[[Path], bool] | None, aside: Path) -> None:
    """Move `new` to `path`; an existing `path` only if `replace` allows it, moved to `aside` (in our scratch)."""
    try:
        return rename_noreplace(new, path)
    except FileExistsError:
        if replace is None:
            raise SejdError(f"{path} was created by another process while sejd was writing it; left it "
                            f"untouched and discarded what sejd wrote") from None
    if not replace(path):
        raise SejdError(f"{path} exists and is not what sejd writes there ({replace.__name__}); refusing to "
                        f"replace it")
    os.rename(path, aside)  # `aside` is in our own scratch folder: nobody else can be there
    if not replace(aside):  # swapped by someone between the check and the move: put it back untouched
        kept = _put_back(aside, path)
        raise SejdError(f"{path} changed while sejd was replacing it; left it as found"
                        + ("" if kept == path else f" at {kept}"))
    try:
        rename_noreplace(new, path)
    except FileExistsError:
        kept = _put_back(aside, path)
        raise SejdError(f"{path} was created by another process while sejd was replacing it; left it "
                        f"untouched, the previous one is at {kept}") from None
    # `aside` is deleted with the scratch folder


def _put_back(aside: Path, path: Path) -> Path:
    """Move what was moved aside back to `path`, or, if that is taken now, to a visible sibling; where it went."""
    try:
        rename_noreplace(aside, path)
        return path
    except FileExistsError:
        kept = path.with_name(f"{path.name}.previous-{secrets.token_hex(4)}")
        rename_noreplace(aside, kept)
        return kept


def write_json(path: str | os.PathLike, data) -> Path:
    """Write `data` as indented JSON, atomically."""
    path = Path(path)
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1) + "\n")
    return path
