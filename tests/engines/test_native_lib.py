"""Loading the native step library the install built: the level chosen, the file checked, bad files refused
with a reason (never an exception or a crash)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sejd.engines import native_lib
from sejd.engines.native_lib import Unavailable

ROOT = Path(__file__).resolve().parents[2]
needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
x86_only = pytest.mark.skipif(not native_lib.is_x86(), reason="x86-64 levels")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The libraries exactly as the install builds them (setup.py build_ext), in a private folder."""
    out = tmp_path_factory.mktemp("built")
    os.chmod(out, 0o755)
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out), "--build-temp",
                           str(out / "tmp")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out / "sejd" / "engines" / "native"


def _planted(folder: Path, source: str) -> Path:
    """A shared library with a step library's name, compiled from `source`."""
    folder.mkdir(exist_ok=True)
    c = folder / "planted.c"
    c.write_text(source)
    lib = folder / "step_x86_64_v3.cpython-311-x86_64-linux-gnu.so"
    subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", "-o", str(lib), str(c)], check=True)
    return lib


@x86_only
def test_levels_follow_the_processor_flags():
    v3 = native_lib.X86_LEVELS["x86-64-v3"]
    assert native_lib.supported_levels(set()) == ["x86-64"]
    assert native_lib.supported_levels(v3) == ["x86-64-v3", "x86-64"]
    assert native_lib.supported_levels(v3 - {"fma"}) == ["x86-64"]
    assert native_lib.supported_levels(native_lib.X86_LEVELS["x86-64-v4"]) == ["x86-64"]  # v4 needs v3's too
    assert native_lib.supported_levels(v3 | native_lib.X86_LEVELS["x86-64-v4"])[0] == "x86-64-v4"


@needs_cc
def test_every_level_the_processor_runs_is_built_and_loads(built):
    for level in native_lib.supported_levels():
        lib = native_lib.load_file(native_lib.library_file(level, built), ("sejd_block_step", "sejd_block_sequential"))
        assert lib.sejd_build_id().decode() == native_lib.expected_build_id()


@needs_cc
def test_a_library_under_umask_002_in_the_users_own_group_loads(built, tmp_path, monkeypatch):
    level = native_lib.supported_levels()[0]
    old = os.umask(0o002)
    try:
        folder = tmp_path / "site"
        folder.mkdir()
        copy = folder / native_lib.library_file(level, built).name
        copy.write_bytes(native_lib.library_file(level, built).read_bytes())  # 0o666 & ~umask: group-writable
    finally:
        os.umask(old)
    assert copy.stat().st_mode & 0o020 and folder.stat().st_mode & 0o020
    monkeypatch.setattr(native_lib, "_private_group", lambda gid: True)
    assert native_lib.load_file(copy, ()).sejd_build_id()
    monkeypatch.setattr(native_lib, "_private_group", lambda gid: False)  # a group with other members
    with pytest.raises(Unavailable, match="writable by group .* other members"):
        native_lib.load_file(copy, ())


def test_the_private_group_rule_reads_the_group_database():
    if not hasattr(os, "getgid"):
        pytest.skip("POSIX groups")
    import grp
    import pwd

    gid = os.getgid()
    others = set(grp.getgrgid(gid).gr_mem) - {pwd.getpwuid(os.getuid()).pw_name}
    others |= {p.pw_name for p in pwd.getpwall() if p.pw_gid == gid and p.pw_uid != os.getuid()}
    assert native_lib._private_group(gid) == (not others)


@needs_cc
@pytest.mark.parametrize("case, message", [
    ("everyone", "writable by every user"),
    ("link", "cannot open"),
    ("garbage", "does not load"),
    ("foreign", "lacks sejd_build_id"),
    ("stale", "built from another step.c"),
])
def test_bad_libraries_are_reasons_not_errors(built, tmp_path, case, message):
    real = native_lib.library_file(native_lib.supported_levels()[0], built)
    folder = tmp_path / "lib"
    folder.mkdir(mode=0o755)
    path = folder / real.name
    if case == "everyone":
        shutil.copy(real, path)
        os.chmod(path, 0o757)
    elif case == "link":
        path.symlink_to(real)
    elif case == "garbage":
        path.write_bytes(b"\x7fELF not really")
    elif case == "foreign":
        path = _planted(folder, "int sejd_block_step(void) { return 0; }\n")
    else:
        path = _planted(folder, 'const char *sejd_build_id(void) { return "0123456789abcdef"; }\n')
    with pytest.raises(Unavailable, match=message):
        native_lib.load_file(path, ("sejd_block_step",))


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="chown needs root")
def test_a_library_owned_by_another_user_is_refused(built, tmp_path):
    real = native_lib.library_file(native_lib.supported_levels()[0], built)
    path = tmp_path / real.name
    shutil.copy(real, path)
    os.chown(path, 12345, 12345)
    with pytest.raises(Unavailable, match="owned by uid 12345"):
        native_lib.load_file(path, ())


@x86_only
def test_a_level_the_processor_lacks_is_refused_not_run(monkeypatch):
    monkeypatch.setattr(native_lib, "cpu_flags", lambda: set())  # a processor with the baseline only
    monkeypatch.setenv("SEJD_NATIVE_ISA", "x86-64-v3")
    with pytest.raises(Unavailable, match="lacks its instructions"):
        native_lib.wanted_level()
    monkeypatch.setenv("SEJD_NATIVE_ISA", "avx9")
    with pytest.raises(Unavailable, match="expected one of x86-64-v4, x86-64-v3, x86-64"):
        native_lib.wanted_level()
    monkeypatch.delenv("SEJD_NATIVE_ISA")
    assert native_lib.wanted_level() == "x86-64"
