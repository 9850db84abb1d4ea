import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from sejd.cli import main
from tests.conftest import make_model


@pytest.fixture
def ml_tarflow_pth(tmp_path):
    """A checkpoint exactly as ml-tarflow writes it: plain state dict, conventional file name."""
    model = make_model()
    path = tmp_path / "toy_model_2_64_4_2_0.05.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("plan", ["sequential", "ujd", "sjd", "gs-jacobi", "reference"])
def test_sample_writes_a_grid_with_every_plan(ml_tarflow_pth, tmp_path, plan, capsys):
    out, js = tmp_path / f"{plan}.png", tmp_path / f"{plan}.json"
    rc = main(["sample", str(ml_tarflow_pth), "--config", '{"head_dim": 32}', "-n", "4", "--seed", "1",
               "--plan", plan, "--guidance", "1.0", "--label", "2", "--out", str(out), "--json", str(js)])
    assert rc == 0
    img = Image.open(out)
    side = (2 * (8 + 1) + 1) * 16  # 2x2 grid of 8x8 images with 1px gaps, scaled x16 to ~128px per image
    assert img.size == (side, side) and img.mode == "RGB"
    stats = json.loads(js.read_text())
    assert len(stats["blocks"]) == 4 and stats["plan"] == plan
    assert "order block decoder" in capsys.readouterr().out


def test_cli_tau_changes_jacobi_iterations(ml_tarflow_pth, tmp_path):
    iters = {}
    for tau in ("0.5", "0"):
        js = tmp_path / f"{tau}.json"
        assert main(["sample", str(ml_tarflow_pth), "--config", '{"head_dim": 32}', "-n", "2", "--plan", "ujd",
                     "--tau", tau, "--json", str(js)]) == 0
        iters[tau] = [b["iterations"] for b in json.loads(js.read_text())["blocks"]]
    assert iters["0"] == [15] * 4 and sum(iters["0.5"]) < sum(iters["0"])


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "sejd.cli", "sample", str(bad), "-n", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("sejd: error:") and "bad.pth" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_bad_label_is_refused(ml_tarflow_pth, capsys):
    assert main(["sample", str(ml_tarflow_pth), "--config", '{"head_dim": 32}', "-n", "1", "--label", "7"]) == 2
    assert "labels must be in [0, 4]" in capsys.readouterr().err


def test_atomic_writes_leave_ordinary_permissions(tmp_path):
    import os
    from sejd.util import write_json
    f = write_json(tmp_path / "x.json", {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("args,message", [
    (["sample", "{ckpt}", "-n", "0"], "-n must be >= 1"),
    (["sample", "{ckpt}", "--config", "[1]"], "--config must be a JSON object"),
    (["bench", "{ckpt}", "--config", '{{"head_dim": 32}}', "--batch", "x"], "--batch must be comma-separated ints"),
    (["bench", "{ckpt}", "--config", '{{"head_dim": 32}}', "--decoders", "fast"], "unknown decoders"),
    (["tune", "{ckpt}", "--tau", "abc"], "--tau must be comma-separated floats"),
    (["tune", "{ckpt}", "--batch", "0"], "--batch must be >= 1"),
])
def test_bad_cli_values_are_one_line_errors(ml_tarflow_pth, capsys, args, message):
    assert main([a.format(ckpt=ml_tarflow_pth) for a in args]) == 2
    assert message in capsys.readouterr().err


def test_build_options_for_another_backend_are_refused(tiny_bundle, capsys):
    assert main(["build", str(tiny_bundle.path), "--backend", "ort-cpu", "--workspace", "64"]) == 2
    assert "--workspace applies to --backend tensorrt only" in capsys.readouterr().err
