import json
import os
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

    from sejd.core.files import write_json
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


@pytest.fixture(autouse=True)
def keep_progress_env(monkeypatch):
    """main() sets SEJD_PROGRESS for the rest of its process (--no-progress, -q); a test restores it."""
    monkeypatch.delenv("SEJD_PROGRESS", raising=False)


def _walk(parser):
    """(command name, parser) for the top level and every subcommand."""
    import argparse
    yield "sejd", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_option_of_every_command_has_help_and_shows_its_default():
    import argparse

    from sejd.cli import build_parser
    commands = dict(_walk(build_parser()))
    assert {"sample", "tune", "export-triton", "serve", "bench", "export", "build", "check", "train"} <= set(commands)
    for name, parser in commands.items():
        text = parser.format_help()
        packed = "".join(text.split())  # help is wrapped at spaces and hyphens
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                                                       argparse._SubParsersAction)):
                continue
            assert action.help, (name, action.dest)
            for flag in action.option_strings:
                assert flag in packed, (name, flag)
                assert "_" not in flag, (name, flag)  # kebab-case; ml-tarflow's spellings are hidden aliases
            if action.option_strings:
                shown = "off" if action.default == argparse.SUPPRESS else action.default
                assert "".join(f"(default: {shown})".split()) in packed, (name, action.dest)


def test_commands_that_open_a_checkpoint_take_its_config():
    from sejd.cli import build_parser
    commands = dict(_walk(build_parser()))
    for name in ("sample", "export", "tune", "serve", "bench", "check"):
        assert "--config" in commands[name].format_help(), name


def test_version_and_exit_status_table(capsys):
    import sejd
    from sejd.cli import build_parser
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"sejd {sejd.__version__}"
    epilog = build_parser().format_help()
    for line in ("0  success", "1  checks failed", "2  usage or input error", "3  internal error"):
        assert line in epilog


@pytest.mark.parametrize("verbose", [False, True])
def test_an_internal_error_is_exit_3_with_the_traceback_only_under_v(ml_tarflow_pth, monkeypatch, capsys, verbose):
    import sejd.runtime.sampler

    def broken(*a, **k):
        raise KeyError("bug")
    monkeypatch.setattr(sejd.runtime.sampler, "sample", broken)
    argv = ["sample", str(ml_tarflow_pth), "--config", '{"head_dim": 32}', "-n", "1"] + (["-v"] if verbose else [])
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == \
        "sejd: internal error: KeyError: 'bug' (run with -v for the traceback)"
    assert ("Traceback" in err) == verbose


def test_logs_go_to_stderr_results_to_stdout_and_quiet_hides_them(tmp_path, capsys, monkeypatch):
    import logging

    import sejd.cli

    def command(a):
        logging.getLogger("sejd.test").info("a log line")
        print("a result")
    monkeypatch.setattr(sejd.cli, "_build", command)
    assert main(["build", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == "a result\n" and err == "a log line\n"
    assert main(["-q", "build", str(tmp_path)]) == 0
    assert capsys.readouterr() == ("a result\n", "")
    assert main(["build", str(tmp_path), "--no-progress"]) == 0  # also accepted after the command
    assert os.environ["SEJD_PROGRESS"] == "0"


def test_export_triton_without_tritonclient_names_the_extra(tiny_bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tritonclient", None)  # `import tritonclient` now raises ImportError
    assert main(["export-triton", str(tiny_bundle.path), "-o", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sejd: error:") and "pip install 'sejd[triton]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "repo").exists()


def test_sample_passes_ml_tarflows_guidance_options(ml_tarflow_pth, tmp_path):
    import numpy as np
    images = {}
    for name, extra in {"plain": [], "attn": ["--attn-temp", "0.5"], "what": ["--guide-what", "a"],
                        "annealed": ["--annealed-guidance"]}.items():
        npy = tmp_path / f"{name}.npy"
        assert main(["sample", str(ml_tarflow_pth), "--config", '{"head_dim": 32}', "-n", "2", "--plan", "sequential",
                     "--guidance", "2", "--no-progress", "--npy", str(npy), *extra]) == 0
        images[name] = np.load(npy)
    for name in ("attn", "what", "annealed"):
        assert np.abs(images[name] - images["plain"]).max() > 1e-4, name


def test_per_sample_makes_gs_jacobi_blocks_per_sample_jacobi(ml_tarflow_pth, tmp_path):
    js = tmp_path / "stats.json"
    assert main(["sample", str(ml_tarflow_pth), "--config", '{"head_dim": 32}', "-n", "2", "--plan", "gs-jacobi",
                 "--per-sample", "--no-progress", "--json", str(js)]) == 0
    blocks = json.loads(js.read_text())["blocks"]
    assert {b["decoder"] for b in blocks} == {"jacobi"} and all(b["sample_iterations"] for b in blocks)


@pytest.mark.parametrize("command, advice", [("sample", "use a smaller batch (-n)"),
                                             ("export", "more memory than this machine has free")])
def test_out_of_memory_gives_the_advice_of_its_command(monkeypatch, capsys, command, advice):
    import sejd.workflows.source as source

    def exhausted(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 150994944 bytes")

    monkeypatch.setattr(source, "open_source", exhausted)
    monkeypatch.setattr("sejd.export.exporter.export_bundle", exhausted)
    args = ["-v", command, "builtin:digits"] + (["-o", "/nonexistent/b"] if command == "export" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "an allocation of 150,994,944 bytes failed" in err and advice in err
