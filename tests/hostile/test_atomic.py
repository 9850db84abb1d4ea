"""Hostile file-system conditions around exports and builds (issue 12, defects 2, 7, 8, 9; progress bars).

Races are made deterministic by wrapping the final move (`sejd.core.files._swap`), kills hit a subprocess that a test
hook holds in a slow step, full and read-only disks are simulated by failing the OS call.
"""

import errno
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import sejd.core.files
from sejd import save_checkpoint
from sejd.core.errors import SejdError
from sejd.core.files import (
    SCRATCH_MARKER,
    SCRATCH_PREFIX,
    atomic_dir,
    rename_noreplace,
    write_json,
)
from sejd.core.util import progress
from sejd.export.exporter import export_bundle
from tests.conftest import make_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ckpt(tmp_path):
    save_checkpoint(make_model(num_blocks=2, layers_per_block=1), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def export(ckpt, out, **kw):
    return export_bundle(ckpt, out, variants=["step_present"], show_progress=False, **kw)


def scratch_left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def before_swap(monkeypatch, action):
    """Run `action(path)` just before atomic_dir's final move (once), as another process would."""
    real, done = sejd.core.files._swap, []

    def swap(new, path, *a):
        if not done:
            done.append(path)
            action(path)
        return real(new, path, *a)

    monkeypatch.setattr(sejd.core.files, "_swap", swap)



# defect 2: the target is re-checked at the moment of the move


def test_export_leaves_a_folder_that_appeared_meanwhile(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "b"

    def someone_else(path):
        path.mkdir()
        (path / "important.txt").write_text("data")

    before_swap(monkeypatch, someone_else)
    with pytest.raises(SejdError) as e:
        export(ckpt, out)
    assert str(out) in one_line(e) and "another process" in str(e.value)
    assert [p.name for p in out.iterdir()] == ["important.txt"]
    assert (out / "important.txt").read_text() == "data"
    assert scratch_left(tmp_path) == []


def test_force_never_replaces_what_is_not_a_bundle_at_the_move(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "b"
    export(ckpt, out)

    def swapped_for_user_data(path):
        path.rename(tmp_path / "elsewhere")
        path.mkdir()
        (path / "important.txt").write_text("data")

    before_swap(monkeypatch, swapped_for_user_data)
    with pytest.raises(SejdError) as e:
        export(ckpt, out, force=True)
    assert "refusing to replace" in one_line(e)
    assert (out / "important.txt").read_text() == "data"
    assert scratch_left(tmp_path) == []


def test_force_replaces_a_bundle_and_deletes_only_it(ckpt, tmp_path):
    out = tmp_path / "b"
    export(ckpt, out)
    (out / "engines").mkdir()
    (out / "engines" / "old.txt").write_text("old")
    export(ckpt, out, force=True)
    assert not (out / "engines").exists()  # the old bundle is gone, the new one in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "ckpt"]


def test_two_exports_to_one_target_exactly_one_wins(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "b"
    results = []

    def second_export_finishes_first(path):
        results.append(export(ckpt, out))

    before_swap(monkeypatch, second_export_finishes_first)
    with pytest.raises(SejdError) as e:
        export(ckpt, out)
    assert str(out) in one_line(e)
    assert len(results) == 1 and results[0].path == out
    assert json.loads((out / "manifest.json").read_text())["graphs"]
    assert scratch_left(tmp_path) == []


@pytest.mark.parametrize("present", [False, True])
def test_rename_without_renameat2_still_refuses_an_existing_target(tmp_path, monkeypatch, present):
    monkeypatch.setattr(sejd.core.files, "_renameat2_noreplace", lambda src, dst: False)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "new.txt").write_text("new")
    if present:
        dst.mkdir()
        (dst / "theirs.txt").write_text("theirs")
        with pytest.raises(FileExistsError):
            rename_noreplace(src, dst)
        assert sorted(p.name for p in dst.iterdir()) == ["theirs.txt"]
    else:
        rename_noreplace(src, dst)
        assert (dst / "new.txt").read_text() == "new" and not src.exists()


# defect 7: results get the user's umask, not mkdtemp's 0700


def test_bundle_and_engines_get_the_users_umask(ckpt, tmp_path):
    from sejd.engines.ort import build_ort

    previous = os.umask(0o002)
    try:
        bundle = export(ckpt, tmp_path / "b")
        engines = build_ort(bundle, "ort-cpu", show_progress=False)
        plan = write_json(tmp_path / "b" / "plan.json", {})
    finally:
        os.umask(previous)
    assert bundle.path.stat().st_mode & 0o777 == 0o775
    assert engines.stat().st_mode & 0o777 == 0o775
    assert plan.stat().st_mode & 0o777 == 0o664


# defect 9: scratch removed on SIGTERM, stale scratch of killed runs removed by the next run

SLOW = """
import sys, time
def slow(*a, **k):
    result = real(*a, **k)
    print("ready", flush=True)
    time.sleep(300)
    return result
{patch}
from sejd import cli
sys.exit(cli.main(sys.argv[1:]))
"""
SLOW_SAVE = "import onnx\nreal = onnx.save_model\nonnx.save_model = slow"
SLOW_SESSION = "import onnxruntime\nreal = onnxruntime.InferenceSession\nonnxruntime.InferenceSession = slow"


def run_until_slow_step(tmp_path, patch, *args, sig=signal.SIGTERM):
    """Run `sejd ARGS` with a step held slow by `patch`, send `sig` there; the exit status."""
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW.format(patch=patch))
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [p for p in tmpdir.iterdir() if p.is_dir()] == []  # no scratch in the system's temporary folder
    return proc.returncode


def test_sigterm_during_export_leaves_nothing(ckpt, tmp_path):
    rc = run_until_slow_step(tmp_path, SLOW_SAVE, "export", ckpt, "-o", tmp_path / "out" / "b", "--variants", "step_present")
    assert rc == 128 + signal.SIGTERM
    assert not (tmp_path / "out").exists()  # also the parent folder the export created


def test_sigterm_during_build_leaves_nothing(ckpt, tmp_path):
    bundle = export(ckpt, tmp_path / "b")
    rc = run_until_slow_step(tmp_path, SLOW_SESSION, "build", bundle.path, "--backend", "ort-cpu",
                             "--precision", "fp16")
    assert rc == 128 + signal.SIGTERM
    assert not (tmp_path / "b" / "engines").exists()


def test_next_run_removes_scratch_of_a_killed_export_and_says_so(ckpt, tmp_path, capsys):
    out = tmp_path / "b"
    rc = run_until_slow_step(tmp_path, SLOW_SAVE, "export", ckpt, "-o", out, "--variants", "step_present",
                             sig=signal.SIGKILL)
    assert rc == -signal.SIGKILL
    killed = [p for p in tmp_path.iterdir() if p.name.startswith(SCRATCH_PREFIX)]
    assert len(killed) == 1 and (killed[0] / SCRATCH_MARKER).is_file()
    unmarked = tmp_path / f"{SCRATCH_PREFIX}b-unmarked"  # looks like ours, but no marker: never removed
    unmarked.mkdir()
    planted = {"live": (os.getppid(), None, sejd.core.files._this_host()),  # its process still runs: kept
               "elsewhere": (dead_pid(), None, "another-host"),  # a pid on another host: unknowable, kept
               "reused": (os.getppid(), "1", sejd.core.files._this_host())}  # that pid is another process now
    for name, (pid, started, host) in planted.items():
        (tmp_path / f"{SCRATCH_PREFIX}b-{name}").mkdir()
        (tmp_path / f"{SCRATCH_PREFIX}b-{name}" / SCRATCH_MARKER).write_text(json.dumps(
            {"tool": "sejd", "pid": pid, "started": started, "host": host}))
    capsys.readouterr()
    export(ckpt, out)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and killed[0].name in err and "b-reused" in err
    assert not killed[0].exists() and unmarked.is_dir()
    assert scratch_left(tmp_path) == sorted([unmarked.name, f"{SCRATCH_PREFIX}b-live", f"{SCRATCH_PREFIX}b-elsewhere"])


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


# defect 8 (file system): one-line errors naming the path and the OS's reason, nothing left behind


def test_export_into_proc_is_one_line(ckpt):
    with pytest.raises(SejdError) as e:
        export(ckpt, "/proc/sejd-x")
    assert "/proc/sejd-x" in one_line(e) and "No such file or directory" in str(e.value)
    assert not Path("/proc/sejd-x").exists()


def test_export_into_read_only_folder_is_one_line(ckpt, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir = os.mkdir

    def read_only(path, *a, **k):  # root ignores permission bits: simulate a read-only mount
        if Path(path).parent == ro:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(SejdError) as e:
        export(ckpt, ro / "b")
    assert str(ro / "b") in one_line(e) and "Read-only file system" in str(e.value)
    assert list(ro.iterdir()) == []


def full_disk(monkeypatch, module, name, write_some):
    """`module.name(...)` does `write_some(...)`, then fails as on a full disk."""
    def full(*a, **k):
        write_some(*a, **k)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(module, name, full)


def full_disk_for_text(monkeypatch):
    real = Path.write_text
    full_disk(monkeypatch, Path, "write_text", lambda path, text, *a, **k: real(path, text[:10]))


def test_export_to_a_full_disk_is_one_line_and_leaves_nothing(ckpt, tmp_path, monkeypatch):
    import onnx

    full_disk(monkeypatch, onnx, "save_model", lambda model, path, *a, **k: Path(path).write_bytes(b"partial"))
    with pytest.raises(SejdError) as e:
        export(ckpt, tmp_path / "new" / "b")
    assert str(tmp_path / "new" / "b") in one_line(e) and "No space left on device" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def instant_tuner(monkeypatch):
    """tune() with its search replaced by one fixed trial; the source it runs on."""
    import sejd.workflows.tune
    from sejd.runtime.plan import named_plan
    from sejd.workflows.source import open_source

    src = open_source("builtin:digits", "torch")
    plan = named_plan("sjd", src.model.config.num_blocks)
    searched = []

    def search(self, *baseline):
        searched.append(True)
        return sejd.workflows.tune.Trial(plan, 1.0, 50.0, [], [])

    monkeypatch.setattr(sejd.workflows.tune.Tuner, "exact_baseline", lambda self: None)
    monkeypatch.setattr(sejd.workflows.tune.Tuner, "search_uniform", search)
    for step in ("per_block_decoder", "relax", "variants", "verify"):
        monkeypatch.setattr(sejd.workflows.tune.Tuner, step, lambda self, best: best)
    monkeypatch.setattr(sejd.workflows.tune.Tuner, "head_to_head", lambda self, tuned: ("tuned", tuned, {}))
    return src, searched


def test_tune_plan_file_naming_a_directory_fails_before_the_search(tmp_path, monkeypatch):
    from sejd.workflows.tune import tune

    src, searched = instant_tuner(monkeypatch)
    with pytest.raises(SejdError) as e:
        tune(src, out=tmp_path, log=lambda *a: None)
    assert str(tmp_path) in one_line(e) and "directory" in str(e.value)
    assert searched == []


def test_tune_writing_plan_to_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import sejd.workflows.tune

    src, _ = instant_tuner(monkeypatch)
    full_disk_for_text(monkeypatch)
    with pytest.raises(SejdError) as e:
        sejd.workflows.tune.tune(src, out=tmp_path / "plan.json", log=lambda *a: None)
    assert str(tmp_path / "plan.json") in one_line(e) and "No space left on device" in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--out", "--json", "--npy"])
def test_sample_output_naming_a_directory_is_one_line(ckpt, tmp_path, capsys, option):
    from sejd.cli import main

    folder = tmp_path / "dir"
    folder.mkdir()
    assert main(["sample", str(ckpt), "-n", "1", "--plan", "sjd", option, str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sejd: error:") and "\n" not in err and str(folder) in err and "directory" in err
    assert list(folder.iterdir()) == [] and scratch_left(tmp_path) == []


def test_failed_write_removes_the_folders_it_created(tmp_path, monkeypatch):
    full_disk_for_text(monkeypatch)
    with pytest.raises(SejdError) as e:
        write_json(tmp_path / "a" / "b" / "x.json", {"k": 1})
    assert "No space left on device" in one_line(e)
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_failure_keeps_an_existing_parent_and_removes_its_scratch(tmp_path):
    with pytest.raises(SejdError):
        with atomic_dir(tmp_path / "x") as new:
            (new / "f").write_text("f")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []


def test_sigterm_raises_only_inside_and_the_previous_handler_comes_back(tmp_path):
    def previous(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(SystemExit) as e:
            with atomic_dir(tmp_path / "x"):
                os.kill(os.getpid(), signal.SIGTERM)
        assert e.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)
    assert list(tmp_path.iterdir()) == []


# issue 13: progress bars only on a terminal, and never with SEJD_PROGRESS=0


class Terminal(io.StringIO):
    def isatty(self):
        return True


def draw(bars=progress):
    for _ in bars(range(3), desc="x", enabled=True):
        pass
    bar = bars(total=3, desc="y", enabled=True)
    bar.update(3)
    bar.set_postfix(a=1)
    bar.close()


def test_no_carriage_return_frames_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.delenv("SEJD_PROGRESS", raising=False)
    draw()
    assert "\r" not in capsys.readouterr().err


@pytest.mark.parametrize("setting, shown", [(None, True), ("0", False)])
def test_sejd_progress_0_turns_bars_off_on_a_terminal(monkeypatch, setting, shown):
    if setting is None:
        monkeypatch.delenv("SEJD_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("SEJD_PROGRESS", setting)
    monkeypatch.setattr(sys, "stderr", Terminal())
    draw()
    assert ("\r" in sys.stderr.getvalue()) == shown


def test_the_silent_bar_takes_every_call_the_code_makes_on_a_bar(monkeypatch):
    """Without a terminal `progress` returns a stand-in: each bar method sejd calls must exist on it too
    (a missing one once ended a published-size export run from a script as an internal error)."""
    import re
    from pathlib import Path

    import sejd

    monkeypatch.setenv("SEJD_PROGRESS", "0")
    bar = progress(range(3), total=3)
    assert list(bar) == [0, 1, 2]
    called = set()
    for f in Path(sejd.__file__).parent.rglob("*.py"):
        called |= set(re.findall(r"\bbar\.(\w+)\(", f.read_text()))
    assert called, "no bar method calls found: the scan is broken"
    for name in called:
        getattr(bar, name)  # AttributeError here is the bug
