"""Hostile command lines: each ends in one line `sejd: error: ...` on stderr with exit status 2, never a
traceback, and before any expensive work (issue 12, defects 3, 8 and 10's CLI items)."""

import json
import resource
import subprocess
import sys

import pytest
import torch

from sejd.cli import EXIT_USAGE, main
from tests.conftest import make_model
from tests.test_cli import keep_progress_env  # noqa: F401 - autouse: restores SEJD_PROGRESS

CONFIG = '{"head_dim": 32}'


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An ml-tarflow checkpoint with a conventional name (head_dim comes from --config)."""
    path = tmp_path_factory.mktemp("ckpt") / "toy_model_2_64_4_2_0.05.pth"
    torch.save(make_model().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    (d / "folder").mkdir()
    for name, content in {"list.json": [1], "string.json": "plan", "null.json": None, "blocks3.json": {"blocks": 3},
                          "blocks-not-objects.json": {"blocks": [1, 2, 3, 4]}}.items():
        (d / name).write_text(json.dumps(content))
    return d


def assert_one_line_error(rc, err, *needles):
    assert rc == EXIT_USAGE, err
    assert err.startswith("sejd: error:") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


BAD = [  # (arguments after the source, words the error must contain)
    (["--out", "{files}/folder"], ["--out", "is a directory"]),
    (["--npy", "{files}/folder"], ["--npy", "is a directory"]),
    (["--json", "{files}/folder"], ["--json", "is a directory"]),
    (["--seed", str(10**23)], ["--seed", "0..2**63-1"]),
    (["--seed", "-1"], ["--seed"]),
    (["-n", "0"], ["-n must be >= 1"]),
    (["-n", "abc"], ["invalid int value"]),
    (["--plan", "{files}/list.json"], ["list.json"]),
    (["--plan", "{files}/string.json"], ["string.json"]),
    (["--plan", "{files}/null.json"], ["null.json"]),
    (["--plan", "{files}/blocks3.json"], ["blocks3.json"]),
    (["--plan", "{files}/blocks-not-objects.json"], ["not an object"]),
    (["--plan", "{files}/missing.json"], ["does not exist"]),
    (["--guidance", "nan"], ["--guidance must be a finite number"]),
    (["--attn-temp", "0"], ["--attn-temp must be a finite number > 0"]),
    (["--tau", "-1"], ["--tau"]),
    (["--guide-what", "c"], ["invalid choice"]),
    (["--config", "{"], ["--config must be JSON"]),
    (["--config", "[1]"], ["--config must be a JSON object"]),
    (["--backend", "cuda"], ["unknown backend"]),
    (["--no-such-option"], ["unrecognized arguments"]),
]


@pytest.mark.parametrize("args,needles", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_sample_command_lines(ckpt, files, capsys, args, needles):
    argv = ["sample", str(ckpt), "--config", CONFIG, "--no-progress"] + [a.replace("{files}", str(files)) for a in args]
    rc = main(argv)
    assert_one_line_error(rc, capsys.readouterr().err, *needles)


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_tune_psnr_must_be_finite_and_positive(ckpt, capsys, value):
    rc = main(["tune", str(ckpt), "--config", CONFIG, f"--psnr={value}"])
    assert_one_line_error(rc, capsys.readouterr().err, "--psnr must be a finite number > 0")


@pytest.mark.parametrize("port", ["0", "65536", "70000", "-5"])
def test_serve_port_out_of_range_fails_before_ray_starts(ckpt, capsys, monkeypatch, port):
    import sejd.serve.app
    monkeypatch.setattr(sejd.serve.app, "serve_forever", lambda *a, **k: pytest.fail("Ray must not start"))
    rc = main(["serve", str(ckpt), "--port", port])
    assert_one_line_error(rc, capsys.readouterr().err, "--port must be a TCP port 1..65535")


@pytest.mark.parametrize("argv,needles", [
    ([], ["the following arguments are required: COMMAND"]),
    (["smaple"], ["invalid choice: 'smaple'"]),
    (["sample"], ["the following arguments are required: source"]),
    (["export", "builtin:digits"], ["-o/--out"]),
    (["build", "{files}/folder"], ["not a sejd bundle"]),
    (["check", "{files}/folder/nothing-here"], []),
    (["bench", "{ckpt}", "--config", CONFIG, "--json", "{files}/folder"], ["--json", "is a directory"]),
    (["bench", "{ckpt}", "--config", CONFIG, "--seed", str(2**64)], ["--seed"]),
    (["tune", "{ckpt}", "--config", CONFIG, "--out", "{files}/folder"], ["--out", "is a directory"]),
    (["check", "{ckpt}", "--config", CONFIG, "--json", "{files}/folder"], ["--json", "is a directory"]),
    (["train", "--dataset", "digits", "--out", "{files}/t", "--steps", "0"], ["--steps must be >= 1"]),
    (["train", "--dataset", "digits", "--out", "{files}/t", "--lr", "nan"], ["--lr must be a finite number > 0"]),
])
def test_bad_command_lines(ckpt, files, capsys, argv, needles):
    rc = main([a if a == CONFIG else a.format(files=files, ckpt=ckpt) for a in argv])
    assert_one_line_error(rc, capsys.readouterr().err, *needles)


def test_n_above_a_bundles_batch_max_fails_before_any_noise_is_drawn(tiny_bundle, capsys, monkeypatch):
    import sejd.runtime.request
    monkeypatch.setattr(sejd.runtime.request, "seeded_noise", lambda *a, **k: pytest.fail("noise drawn before the check"))
    batch_max = tiny_bundle.manifest["batch_max"]
    rc = main(["sample", str(tiny_bundle.path), "-n", str(batch_max + 1), "--no-progress"])
    assert_one_line_error(rc, capsys.readouterr().err, f"-n {batch_max + 1}", f"batch_max {batch_max}")


def test_an_unwritable_output_names_the_path(ckpt, capsys):
    # /proc takes no new files, even for root; the check up front or the write itself names it
    rc = main(["sample", str(ckpt), "--config", CONFIG, "-n", "1", "--plan", "ujd", "--no-progress",
               "--npy", "/proc/sejd-test.npy"])
    assert_one_line_error(rc, capsys.readouterr().err, "/proc")


def _limit_memory():  # the child gets 3 GiB of address space: a runaway allocation fails instead of swapping
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


@pytest.mark.parametrize("args,needles", [
    (["sample", "{ckpt}", "--config", CONFIG, "-n", str(10**7), "--no-progress"], ["bytes"]),
    (["sample", "{ckpt}", "--config", CONFIG, "--seed", str(10**23)], ["--seed"]),
    (["serve", "{ckpt}", "--port", "70000"], ["--port"]),
    (["sample", "{ckpt}", "-n"], ["expected one argument"]),
])
def test_in_a_fresh_process(ckpt, args, needles):
    proc = subprocess.run([sys.executable, "-m", "sejd.cli", *[a.replace("{ckpt}", str(ckpt)) for a in args]],
                          capture_output=True, text=True, timeout=300, preexec_fn=_limit_memory)
    assert_one_line_error(proc.returncode, proc.stderr, *needles)
