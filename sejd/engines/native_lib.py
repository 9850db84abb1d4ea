"""Finding and loading the native CPU step library that the install compiled (see setup.py).

The install builds `sejd/engines/native/step.c` once per instruction-set level (x86-64: baseline,
x86-64-v3 = AVX2 + FMA, x86-64-v4 = AVX-512; elsewhere one generic build). Here, at run time:

- the highest level this processor supports is chosen (`SEJD_NATIVE_ISA` picks a lower one; a level the
  processor lacks is refused, never run: it would die on an illegal instruction);
- the file is opened once, without following links, and the open file is checked: a regular file,
  owned by this user or root, and writable by nobody else (group write only when the group is this
  user's own); its folder likewise. The library is then loaded from that open file
  (`/proc/self/fd/N`), so what is loaded is what was checked, not a path checked earlier;
- the library must say it was built from this package's own step.c (`sejd_build_id()` = the source's
  sha256 prefix) and have every function sejd calls.

Anything else (no library: the install had no C compiler; a library that fails to load, a stale or
foreign one) is a reason, returned as a string: ort-cpu then runs single tokens in ONNX graphs and
logs the reason once. Nothing is ever compiled at run time and nothing is loaded from a bundle.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import stat
from pathlib import Path

LIB_DIR = Path(__file__).with_name("native")
SOURCE = LIB_DIR / "step.c"
# what each x86-64 level needs, as /proc/cpuinfo names the flags (the psABI's levels)
X86_LEVELS = {
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
    "x86-64-v3": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},
    "x86-64": set(),
}


_held: list[int] = []  # descriptors of the libraries loaded through /proc/self/fd


class Unavailable(Exception):
    """Why the native step cannot be loaded here (one sentence)."""


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def supported_levels(flags: set[str] | None = None) -> list[str]:
    """The instruction-set levels this processor runs, best first."""
    if not is_x86():
        return ["generic"]
    flags = cpu_flags() if flags is None else flags
    ok, need = [], set()
    for name in reversed(list(X86_LEVELS)):  # each level includes the ones below it
        need |= X86_LEVELS[name]
        if need <= flags:
            ok.append(name)
    return ok[::-1]


def library_file(level: str, folder: Path | None = None) -> Path | None:
    """The built library of `level` in `folder` (the package's), or None when the install made none."""
    stem = f"step_{level.replace('-', '_')}."
    found = sorted(p for p in (folder or LIB_DIR).glob(stem + "*") if p.suffix in (".so", ".dylib", ".pyd"))
    return found[0] if found else None


def expected_build_id() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def _private_group(gid: int) -> bool:
    """True when `gid` is a group of this user alone (the usual user-private group under umask 002)."""
    try:
        import grp
        import pwd
    except ImportError:
        return False
    uid = os.getuid()
    try:
        me, group = pwd.getpwuid(uid).pw_name, grp.getgrgid(gid)
    except KeyError:
        return False
    if set(group.gr_mem) - {me}:
        return False
    return all(p.pw_uid == uid for p in pwd.getpwall() if p.pw_gid == gid)


def writable_by_others(st: os.stat_result) -> str | None:
    """None when only this user (or root, who owns installed packages) can change the file, else why not."""
    if not hasattr(os, "getuid"):
        return None
    if st.st_uid not in (os.getuid(), 0):
        return f"owned by uid {st.st_uid}, not by this user or root"
    if st.st_mode & 0o002:
        return f"writable by every user (mode {st.st_mode & 0o777:o})"
    if st.st_mode & 0o020 and not _private_group(st.st_gid):
        return f"writable by group {st.st_gid}, which has other members (mode {st.st_mode & 0o777:o})"
    return None


def open_checked(path: Path) -> int:
    """A descriptor of `path`, opened without following a link, after checking the open file and its
    folder (see the module's doc). Raises Unavailable."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise Unavailable(f"cannot open {path} ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unavailable(f"{path} is not a regular file")
        for what, s in ((path, st), (path.parent, os.stat(path.parent))):
            why = writable_by_others(s)
            if why:
                raise Unavailable(f"{what} is {why}; make it private (chmod go-w) or reinstall sejd")
        return fd
    except BaseException:
        os.close(fd)
        raise


def load_file(path: Path, symbols: tuple[str, ...]) -> ctypes.CDLL:
    """The library at `path`, checked (open_checked), built from this step.c and having `symbols`."""
    fd = open_checked(path)
    where = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else str(path)
    try:
        lib = ctypes.CDLL(where)
    except OSError as e:
        os.close(fd)
        raise Unavailable(f"{path} does not load ({e})") from None
    if where == str(path):
        os.close(fd)
    else:  # the dynamic loader knows a loaded library by the name it was opened with: a loaded one keeps
        _held.append(fd)  # its descriptor, so that no later /proc/self/fd/N is taken for it
    if not hasattr(lib, "sejd_build_id"):
        raise Unavailable(f"{path} lacks sejd_build_id: not a sejd step library")
    lib.sejd_build_id.restype = ctypes.c_char_p
    built = lib.sejd_build_id().decode(errors="replace")
    if built != expected_build_id():
        raise Unavailable(f"{path} was built from another step.c (build {built}, this package's source is "
                          f"{expected_build_id()}); reinstall sejd (`pip install -e .` in a checkout)")
    missing = [s for s in symbols if not hasattr(lib, s)]
    if missing:
        raise Unavailable(f"{path} lacks {', '.join(missing)}")
    return lib


def wanted_level() -> str:
    """The level to load: `SEJD_NATIVE_ISA`, or the best this processor runs. Raises Unavailable."""
    levels = supported_levels()
    asked = os.environ.get("SEJD_NATIVE_ISA")
    if not asked:
        return levels[0]
    known = list(X86_LEVELS) if is_x86() else ["generic"]
    if asked not in known:
        raise Unavailable(f"SEJD_NATIVE_ISA={asked!r}: expected one of {', '.join(known)}")
    if asked not in levels:
        raise Unavailable(f"SEJD_NATIVE_ISA={asked}: this processor lacks its instructions "
                          f"(it runs {', '.join(levels)})")
    return asked


@functools.lru_cache(maxsize=None)
def load(symbols: tuple[str, ...]) -> tuple[ctypes.CDLL, str]:
    """(the library, its level), loaded once per process. Raises Unavailable."""
    level = wanted_level()
    path = library_file(level)
    if path is None:
        raise Unavailable(f"not built for {level} at install (no C compiler then?); reinstall sejd with a C "
                          f"compiler to get it")
    return load_file(path, symbols), level
