"""The package as a user installs it: a wheel (not an editable install) in a fresh virtual environment."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
SKIP = {".git", ".venv", "out", "build", "dist", "runs", ".pytest_cache", "__pycache__"}
BUILT = (".so", ".dylib", ".pyd")  # this checkout's own build of the native step: the wheel makes its own


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the source tree (offline: no build isolation, no dependencies)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith((".egg-info", *BUILT))])
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(tmp / "dist"), str(src)])
    (whl,) = (tmp / "dist").glob("sejd-*.whl")
    return whl


def test_wheel_ships_the_builtin_models(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in ("digits", "textures"):
        assert {f"sejd/assets/{model}/model.safetensors", f"sejd/assets/{model}/config.json"} <= names
    assert not any(n.startswith("tests/") for n in names)
    assert "sejd/engines/native/step.c" in names  # the source the built libraries must match


def test_wheel_carries_the_native_step_for_every_instruction_set_level(wheel):
    """Built at install, once per level, so the wheel runs on another machine of the platform."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: the optional native step is not built")
    from sejd.engines import native_lib

    names = zipfile.ZipFile(wheel).namelist()
    levels = list(native_lib.X86_LEVELS) if native_lib.is_x86() else ["generic"]
    for level in levels:
        stem = f"sejd/engines/native/step_{level.replace('-', '_')}."
        assert any(n.startswith(stem) and n.endswith(".so") for n in names), f"no {stem}*.so in the wheel"


def test_wheel_in_a_fresh_venv_samples_a_builtin_model(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # dependencies (torch, onnx, ...) come from this environment's site-packages, read as plain paths, so its
    # own .pth files (among them the editable install of this checkout) are not processed
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)])

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = _run([str(python), "-c", "import sejd; print(sejd.__file__); print(sejd.__version__)"],
                 cwd=tmp_path, env=env).stdout.split()
    assert Path(where[0]).is_relative_to(site), f"sejd imported from {where[0]}, not the wheel in {site}"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert where[1] == version

    if shutil.which("cc") or shutil.which("gcc"):  # the installed wheel's own native step loads there
        loaded = _run([str(python), "-c", "from sejd.engines import native; print(native.available() or native.level())"],
                      cwd=tmp_path, env=env).stdout.strip()
        assert loaded.startswith(("x86-64", "generic")), loaded
    out = tmp_path / "grid.png"
    _run([str(venv / "bin" / "sejd"), "sample", "builtin:digits", "-n", "2", "--plan", "sjd", "--out", str(out)],
         cwd=tmp_path, env=env)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("module, extra", [("matplotlib", "report"), ("ray.serve", "serve"), ("onnxruntime", "cpu")])
def test_a_missing_extra_is_one_error_naming_it(monkeypatch, module, extra):
    from sejd.core.errors import SejdError
    from sejd.core.extras import require

    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(SejdError, match=rf"needs {module.split('.')[0]}, which is not installed .*"
                                        rf"pip install 'sejd\[{extra}\]'"):
        require(module, "this command")


def test_bench_plot_without_matplotlib_names_the_report_extra(monkeypatch, tmp_path):
    from sejd.core.extras import MissingExtra
    from sejd.workflows.bench import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtra, match=r"sejd\[report\]"):
        plot({"runs": []}, tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()
