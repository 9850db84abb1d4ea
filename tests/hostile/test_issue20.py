"""Issue 20's reproductions (items 2-6 and 8-11, the CLI and file-system ones): each failed on the code it was
filed against; nothing a user owns is lost, nothing hangs, and an input error is exit 2, never 3."""

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

import sejd.workflows.source
from sejd import save_checkpoint
from sejd.cli import EXIT_USAGE, main
from sejd.export.bundle import BundleError
from sejd.export.weights import tensor_bytes
from sejd.runtime.plan import named_plan
from tests.conftest import make_model
from tests.hostile.test_bundle_paths import (
    copy_bundle,
    graph_entry,
    read_manifest,
    write_manifest,
)
from tests.hostile.test_outputs import tree_hash
from tests.test_cli import keep_progress_env  # noqa: F401 - autouse: restores SEJD_PROGRESS

REPO = Path(__file__).resolve().parents[2]


def refused(rc, err, *needles):
    assert rc == EXIT_USAGE, err
    assert err.startswith("sejd: error:") and len(err.strip().splitlines()) == 1, err
    assert "internal error" not in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def cli(capsys, *argv):
    rc = main([str(a) for a in argv] + ["--no-progress"])
    return rc, capsys.readouterr().err


def cli_process(*argv, timeout=120):
    """In a fresh process with a deadline: what used to hang fails the test instead of stalling it."""
    proc = subprocess.run([sys.executable, "-m", "sejd.cli", *map(str, argv), "--no-progress"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    return copy_bundle(tiny_bundle, tmp_path / "b", engines=True)


@pytest.fixture
def no_model(monkeypatch):
    def work(*a, **k):
        pytest.fail("a model was opened before the command line was checked")
    monkeypatch.setattr(sejd.workflows.source, "open_source", work)


# item 2: --force replaces only what sejd itself wrote


def test_export_force_keeps_a_folder_that_merely_holds_a_manifest(tmp_path, capsys, monkeypatch):
    import sejd.export.exporter

    monkeypatch.setattr(sejd.export.exporter, "load_checkpoint", lambda *a, **k: pytest.fail("work started"))
    app = tmp_path / "app"
    app.mkdir()
    (app / "manifest.json").write_text("{}\n")
    (app / "notes.txt").write_text("keep\n")
    rc, err = cli(capsys, "export", "builtin:digits", "-o", app, "--force")
    refused(rc, err, str(app), "--force does not replace it")
    assert sorted(p.name for p in app.iterdir()) == ["manifest.json", "notes.txt"]
    assert (app / "notes.txt").read_text() == "keep\n"


def test_export_force_keeps_a_bundle_holding_a_foreign_file(tiny_bundle, tmp_path, capsys):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    (b / "notes.txt").write_text("keep\n")
    rc, err = cli(capsys, "export", tiny_bundle.path / "model", "-o", b, "--force")
    refused(rc, err, "notes.txt")
    assert (b / "notes.txt").read_text() == "keep\n"


def test_export_force_replaces_a_bundle_sejd_wrote(tiny_bundle, tmp_path, capsys):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    rc, err = cli(capsys, "export", tiny_bundle.path / "model", "-o", b, "--force", "--variants", "step_rows")
    assert rc == 0, err
    assert {g["variant"] for g in read_manifest(b)["graphs"]} == {"step_rows"}


def test_export_triton_force_replaces_only_a_model_sejd_exported(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert cli(capsys, "export-triton", bundle, "-o", repo, "--name", "m")[0] == 0
    rc, err = cli(capsys, "export-triton", bundle, "-o", repo, "--name", "m")
    refused(rc, err, "pass --force")
    assert cli(capsys, "export-triton", bundle, "-o", repo, "--name", "m", "--force")[0] == 0  # sejd's: replaced
    (repo / "m" / "notes.txt").write_text("keep\n")
    rc, err = cli(capsys, "export-triton", bundle, "-o", repo, "--name", "m", "--force")
    refused(rc, err, "notes.txt")
    assert (repo / "m" / "notes.txt").read_text() == "keep\n"


# item 3: outputs that name an input (the generated matrix is in test_outputs.py)


@pytest.mark.parametrize("option,rel", [("--json", "manifest.json"), ("--npy", "blocks/0/weights.bin")])
def test_sample_output_inside_the_bundle_is_refused(bundle, capsys, no_model, option, rel):
    before = tree_hash(bundle)
    rc, err = cli(capsys, "sample", bundle, "-n", "1", option, bundle / rel)
    refused(rc, err, option, str(bundle / rel), f"the bundle {bundle}")
    assert tree_hash(bundle) == before


def test_sample_npy_over_its_own_checkpoint_is_refused(tmp_path, capsys, no_model):
    pth = tmp_path / "toy_model_2_64_4_2_0.05.pth"
    torch.save(make_model().state_dict(), pth)
    before = pth.read_bytes()
    rc, err = cli(capsys, "sample", pth, "--config", '{"head_dim": 32}', "-n", "1", "--npy", pth)
    refused(rc, err, "--npy", "the checkpoint")
    assert pth.read_bytes() == before


def test_sample_npy_and_json_to_one_file_is_refused(tmp_path, capsys, no_model):
    rc, err = cli(capsys, "sample", "builtin:digits", "-n", "1", "--npy", tmp_path / "o", "--json", tmp_path / "o")
    refused(rc, err, "--npy", "--json", "same file")
    assert not (tmp_path / "o").exists()


def test_sejd_pair_checkpoint_json_is_an_input(tmp_path, capsys, no_model):
    save_checkpoint(make_model(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").rename(tmp_path / "m.safetensors")
    (tmp_path / "ckpt" / "config.json").rename(tmp_path / "m.json")
    rc, err = cli(capsys, "sample", tmp_path / "m.safetensors", "-n", "1", "--json", tmp_path / "m.json")
    refused(rc, err, "is the checkpoint")


# item 4: train --out over a checkpoint


@pytest.fixture
def trained(tmp_path):
    """A folder holding what `sejd train` leaves (a sejd checkpoint)."""
    save_checkpoint(make_model(), tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def no_training(monkeypatch):
    import sejd.workflows.train
    monkeypatch.setattr(sejd.workflows.train, "load_dataset", lambda *a, **k: pytest.fail("training started"))


def test_train_over_a_checkpoint_needs_force(trained, capsys, no_training):
    before = tree_hash(trained)
    rc, err = cli(capsys, "train", "--dataset", "digits", "--out", trained, "--steps", "2")
    refused(rc, err, "holds a checkpoint", "--force")
    assert tree_hash(trained) == before


def test_train_force_never_replaces_a_config_json_sejd_did_not_write(tmp_path, capsys, no_training):
    app = tmp_path / "app"
    app.mkdir()
    (app / "config.json").write_text('{"port": 80}\n')
    rc, err = cli(capsys, "train", "--dataset", "digits", "--out", app, "--steps", "2", "--force")
    refused(rc, err, "is not a checkpoint sejd saved", "so --force does not replace it")
    assert (app / "config.json").read_text() == '{"port": 80}\n'


def test_train_force_replaces_a_checkpoint_sejd_saved(trained, capsys):
    pytest.importorskip("sklearn")
    (trained / "notes.txt").write_text("keep\n")
    rc, err = cli(capsys, "train", "--dataset", "digits", "--out", trained, "--steps", "2", "--batch-size", "4",
                  "--channels", "32", "--blocks", "2", "--layers-per-block", "1", "--head-dim", "16", "--force")
    assert rc == 0, err
    assert json.loads((trained / "config.json").read_text())["training"]["steps"] == 2
    assert (trained / "notes.txt").read_text() == "keep\n"


def test_train_state_that_is_a_fifo_is_refused(tmp_path, capsys, no_training):
    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / "train_state.pt")
    rc, err = cli(capsys, "train", "--dataset", "digits", "--out", tmp_path / "run", "--steps", "2")
    refused(rc, err, "train_state.pt is not a regular file")


# item 5: a FIFO where a manifest should be


@pytest.mark.parametrize("rel", ["manifest.json", "engines/ort-cpu/manifest.json"])
def test_a_fifo_manifest_is_refused_not_waited_on(bundle, rel):
    (bundle / rel).unlink()
    os.mkfifo(bundle / rel)
    rc, err = cli_process("sample", bundle, "-n", "1", "--plan", "sequential", timeout=120)
    refused(rc, err, rel, "not a regular file")


def test_a_fifo_plan_file_is_refused(bundle, tmp_path):
    os.mkfifo(tmp_path / "p.json")
    rc, err = cli_process("sample", bundle, "-n", "1", "--plan", tmp_path / "p.json", timeout=120)
    refused(rc, err, "p.json")


# item 6: sejd's own external-data reader is confined


def external(tensor_dims, location, offset=None, length=None, data_type=onnx.TensorProto.FLOAT):
    t = onnx.TensorProto(name="w", dims=tensor_dims, data_type=data_type,
                         data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            e = t.external_data.add()
            e.key, e.value = key, str(value)
    return t


@pytest.fixture
def graph_dir(tmp_path):
    d = tmp_path / "graph"
    d.mkdir()
    (d / "weights.bin").write_bytes(bytes(range(64)))
    (tmp_path / "secret.bin").write_bytes(b"s" * 64)
    return d


@pytest.mark.parametrize("location,length,says", [
    ("{secret}", 16, "is absolute"),
    ("../secret.bin", 16, "not normalised"),
    ("weights.bin", None, "no length"),
    ("weights.bin", 128, "past the end"),
    ("weights.bin", 8, "is not the 16 bytes of its shape"),
    ("link.bin", 16, "outside the graph's folder"),
])
def test_external_data_outside_the_graph_or_beyond_its_file_is_refused(graph_dir, location, length, says):
    os.symlink(graph_dir.parent / "secret.bin", graph_dir / "link.bin")
    t = external([4], location.format(secret=graph_dir.parent / "secret.bin"), 0, length)
    with pytest.raises(BundleError, match=says):
        tensor_bytes(t, graph_dir)


def test_external_data_inside_the_graph_folder_is_read(graph_dir):
    assert tensor_bytes(external([4], "weights.bin", 16, 16), graph_dir) == bytes(range(16, 32))


def test_a_fifo_as_external_data_is_refused(graph_dir):
    import threading

    os.mkfifo(graph_dir / "fifo.bin")

    def writer():  # a reader that waits on the FIFO is released after 10 s (and the test fails, not hangs)
        try:
            os.close(os.open(graph_dir / "fifo.bin", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waiting: nothing to release
            pass
    release = threading.Timer(10, writer)
    release.daemon = True
    release.start()
    try:
        with pytest.raises(BundleError, match="not a regular file"):
            tensor_bytes(external([4], "fifo.bin", 0, 16), graph_dir)
    finally:
        release.cancel()


# item 8: input errors are exit 2


def _engine_graph_replaced(bundle, text: bytes):
    rel = "blocks/0/jacobi.onnx"
    (bundle / "engines/ort-cpu" / rel).write_bytes(text)
    mf = bundle / "engines/ort-cpu/manifest.json"
    m = json.loads(mf.read_text())
    m["files"][rel] = hashlib.sha256(text).hexdigest()
    mf.write_text(json.dumps(m))


def test_an_engine_graph_onnx_runtime_refuses_is_exit_2(bundle, capsys):
    _engine_graph_replaced(bundle, b"not a graph")
    rc, err = cli(capsys, "sample", bundle, "-n", "1", "--plan", "ujd")
    refused(rc, err, "ONNX Runtime refuses a graph", "jacobi.onnx")


@pytest.mark.parametrize("pin", [5, ["a"], "abc"])
def test_a_plan_whose_pin_is_not_a_sha256_is_exit_2(bundle, tmp_path, capsys, pin):
    plan = named_plan("sjd", 4).to_dict()
    plan["meta"] = {"bundle_manifest_sha256": pin}
    (tmp_path / "p.json").write_text(json.dumps(plan))
    rc, err = cli(capsys, "sample", bundle, "-n", "1", "--plan", tmp_path / "p.json")
    refused(rc, err, "bundle_manifest_sha256")


@pytest.mark.parametrize("content,says", [(b"\xff\xfe{}", "not UTF-8"), (b"[" * 100_000, "nested too deeply"),
                                          (b"1" * 5000, "not valid JSON")])
@pytest.mark.parametrize("where", ["--plan", "plan.json"])
def test_a_plan_that_is_not_utf8_or_nests_too_deeply_is_exit_2(bundle, tmp_path, capsys, content, says, where):
    path = tmp_path / "p.json" if where == "--plan" else bundle / "plan.json"
    path.write_bytes(content)
    argv = ["sample", bundle, "-n", "1"] + (["--plan", path] if where == "--plan" else [])
    rc, err = cli(capsys, *argv)
    refused(rc, err, says)


def test_analyze_plan_file_that_is_not_utf8_is_refused_before_work(bundle, tmp_path, capsys, no_model):
    (tmp_path / "p.json").write_bytes(b"\xff")
    rc, err = cli(capsys, "analyze", bundle, "--plan", tmp_path / "p.json")
    refused(rc, err, "not UTF-8")


def test_a_graph_entry_pointing_at_another_graph_is_exit_2(bundle, capsys):
    m = read_manifest(bundle)
    graph_entry(m)["file"] = "blocks/0/step_rows.onnx"
    write_manifest(bundle, m)
    rc, err = cli(capsys, "sample", bundle, "-n", "1", "--plan", "ujd")
    refused(rc, err, "blocks/0/jacobi.onnx", "step_rows.onnx")


def test_a_disk_that_fills_while_export_saves_the_model_is_exit_2(tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk in its own exception type (once exit 3); nothing half-written stays."""
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "new" / "b"
    rc, err = cli(capsys, "export", "builtin:digits", "-o", out)
    refused(rc, err, f"cannot write {out}: No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_real_full_disk_during_export_is_exit_2(tmp_path):
    """On a 4 MiB tmpfs (where this test may mount one): the model alone does not fit."""
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        rc, err = cli_process("export", "builtin:digits", "-o", small / "b")
        refused(rc, err, f"cannot write {small / 'b'}", os.strerror(errno.ENOSPC))
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


# item 9: export-triton into its own bundle


def test_export_triton_into_its_own_bundle_is_refused_at_once(bundle, capsys):
    before = tree_hash(bundle)
    rc, err = cli(capsys, "export-triton", bundle, "-o", bundle)
    refused(rc, err, "lies inside the bundle")
    assert len(err) < 1000
    assert tree_hash(bundle) == before


# item 10: unwritable output folders fail before the work


def test_train_into_an_unwritable_folder_fails_before_training(capsys, no_training):
    rc, err = cli(capsys, "train", "--dataset", "digits", "--out", "/proc/sejd-test/run", "--steps", "2")
    refused(rc, err, "--out", "/proc")


def test_check_save_failures_into_an_unwritable_folder_fails_before_checking(bundle, capsys, monkeypatch):
    import sejd.workflows.check
    monkeypatch.setattr(sejd.workflows.check, "check_bundle", lambda *a, **k: pytest.fail("checking started"))
    rc, err = cli(capsys, "check", bundle, "--save-failures", "/proc/sejd-test/f")
    refused(rc, err, "--save-failures", "/proc")


def test_check_save_failures_naming_a_file_is_refused(bundle, tmp_path, capsys, no_model):
    (tmp_path / "f").write_text("x")
    rc, err = cli(capsys, "check", bundle, "--save-failures", tmp_path / "f")
    refused(rc, err, "--save-failures", "is a file")


# item 11: early checks


@pytest.mark.parametrize("command", [["sample"], ["bench"], ["tune"], ["analyze"], ["check"], ["serve"],
                                     ["export", "-o", "{tmp}/b"]])
@pytest.mark.parametrize("name", ["../../x", "../assets/digits", "", "digits/../textures"])
def test_builtin_names_that_are_no_shipped_model_are_refused_before_loading(tmp_path, capsys, monkeypatch, no_model,
                                                                           command, name):
    import sejd.export.exporter
    import sejd.serve.app
    monkeypatch.setattr(sejd.export.exporter, "load_checkpoint", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr(sejd.serve.app, "serve_forever", lambda *a, **k: pytest.fail("Ray started"))
    argv = [command[0], f"builtin:{name}"] + [a.format(tmp=tmp_path) for a in command[1:]]
    rc, err = cli(capsys, *argv)
    refused(rc, err, "unknown builtin model")


@pytest.mark.parametrize("command", ["sample", "bench", "tune"])
@pytest.mark.parametrize("value", ["1e30", "-1", "101", "inf"])
def test_guidance_beyond_its_range_is_refused_before_loading(capsys, no_model, command, value):
    rc, err = cli(capsys, command, "builtin:digits", f"--guidance={value}")
    refused(rc, err, "--guidance must be a finite number from 0 to 100")
