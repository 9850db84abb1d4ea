"""The ONNX Runtime block runner runs every decoder unchanged and matches the PyTorch runner."""

import json

import pytest
import torch

from sejd import InputError, sample
from sejd.cli import main
from sejd.core.errors import BackendUnavailable
from sejd.engines.native import available as native_available
from sejd.engines.ort import build_ort, ort_runners, unavailable_reason
from sejd.export.bundle import BundleError, load_bundle
from sejd.runtime.plan import named_plan
from sejd.workflows.check import check_bundle


@pytest.fixture
def built(tiny_bundle):
    return tiny_bundle


def plan_with(name, variant):
    plan = named_plan(name, 4)
    for b in plan.blocks:
        if variant in ("loop", "chunk") and b.decoder == "jacobi" or variant == "loop" and b.decoder == "sequential":
            b.variant, b.chunk = variant, 4
    return plan


@pytest.mark.parametrize("plan", ["sequential", "ujd", "sjd", "gs-jacobi", ("sjd", "chunk"), ("sjd", "loop"),
                                  ("ujd", "loop")])
@pytest.mark.parametrize("native_step", [True, False], ids=["native-step", "onnx-step"])
def test_every_decoder_runs_unchanged_on_ort(built, plan, native_step, monkeypatch):
    if not native_step:  # the ONNX step graphs, as on a machine without a C compiler
        monkeypatch.setenv("SEJD_NATIVE_STEP", "0")
    plan = plan_with(*plan) if isinstance(plan, tuple) else plan
    model = built.load_model()
    runners = ort_runners(built)
    assert hasattr(runners[0], "native") == (native_step and native_available() is None)
    noise = torch.randn(3, 16, 12, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 2, 4])
    kw = dict(labels=labels, plan=plan, guidance=1.0, progress=False)
    ref = sample(model, noise, **kw)
    got = sample(model, noise, runners=runners, **kw)
    torch.testing.assert_close(got.images, ref.images, atol=1e-4, rtol=0)
    assert [b.iterations for b in got.stats.blocks] == [b.iterations for b in ref.stats.blocks]


def test_capped_jacobi_finishes_exactly_on_ort(built):
    model = built.load_model()
    plan = named_plan("ujd", 4, tau=0.0)
    for b in plan.blocks:
        b.max_iters = 3
    noise = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(1))
    exact = sample(model, noise, plan="sequential", progress=False)
    got = sample(model, noise, plan=plan, runners=ort_runners(built), progress=False)
    torch.testing.assert_close(got.images, exact.images, atol=1e-4, rtol=0)
    assert all(not b.converged and b.iterations == 3 for b in got.stats.blocks)


def test_wrong_token_count_is_refused_before_the_backend(built):
    runner = ort_runners(built)[0]
    from sejd.runtime.runner import Conditioning
    runner.begin(2, Conditioning.build(2, 16))
    with pytest.raises(InputError, match="input 'z' must have shape"):
        runner.jacobi_iter(torch.zeros(2, 15, 12), torch.zeros(2, 15, 12))
    with pytest.raises(InputError, match="must be float32, got float64"):
        runner.project(torch.zeros(2, 1, 12, dtype=torch.float64), 0)


def test_check_report_passes_and_lists_every_graph(built, tmp_path):
    report = check_bundle(built, "ort-cpu", plans=("sequential", "sjd"), show_progress=False)
    assert report, report.summary()
    names = [c.name for c in report.checks]
    graphs = [n for n in names if n.startswith("block ") and not n.endswith(("native step", "step_fused"))]
    assert len(graphs) == 7 * 4 and "forward" in names
    native_step = [n for n in names if n.endswith("native step")]  # the native step answers to step_rows' contract
    assert native_step == ([f"block {k} native step" for k in range(4)] if native_available() is None else [])
    # so does the fused step graph the build shipped for every block, checked whichever runs single tokens
    assert [n for n in names if n.endswith("step_fused")] == [f"block {k} step_fused" for k in range(4)]
    assert all(f"block {k} step_fused" in report.scope["graphs_compared"] for k in range(4))
    for c in report.checks:
        if c.name.startswith("block") or c.name == "forward":
            loop = c.name.endswith("_loop")
            assert c.figures["max_abs"] <= c.figures["atol"] == (1e-3 if loop else 1e-4)


def test_check_fails_a_native_step_that_drifts(built, monkeypatch):
    if native_available() is not None:
        pytest.skip(native_available())
    from sejd.engines.native import NativeBlock

    real = NativeBlock.step

    def drifting(self, *args, **kw):  # 2e-4 off: twice the contract's tolerance
        xa, xb = real(self, *args, **kw)
        return xa + 2e-4, xb

    monkeypatch.setattr(NativeBlock, "step", drifting)
    report = check_bundle(built, "ort-cpu", plans=(), show_progress=False)
    failed = {c.name: c.figures for c in report.checks if not c.passed}
    assert set(failed) == {f"block {k} native step" for k in range(4)} and not report
    assert all(f["worst_output"] == "xa" and 2e-4 <= f["max_abs"] < 3e-4 for f in failed.values())


def test_check_cli_exit_status_and_json(built, tmp_path, capsys):
    js = tmp_path / "check.json"
    assert main(["check", str(built.path), "--backend", "ort-cpu", "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    assert data["passed"] and all("figures" in c for c in data["checks"])


def test_engines_of_another_export_are_refused(built, tmp_path):
    import shutil
    dst = tmp_path / "b"
    shutil.copytree(built.path, dst)
    m = json.loads((dst / "engines/ort-cpu/manifest.json").read_text())
    m["bundle_manifest_sha256"] = "0" * 64
    (dst / "engines/ort-cpu/manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="built from another export"):
        ort_runners(load_bundle(dst))
    shutil.rmtree(dst / "engines")
    with pytest.raises(BundleError, match="no ort-cpu engines; build them"):
        ort_runners(load_bundle(dst))


def test_an_engine_graph_swapped_for_another_with_a_consistent_hash_is_an_input_error(built, tmp_path, capsys):
    """Every listed file verifies, yet `jacobi`'s engine is the `step_rows` graph: refused by its inputs
    (exit 2 naming the file), not an ONNX Runtime error at the first call (exit 3)."""
    import shutil

    from sejd.engines.ort import OrtSessions
    from sejd.export.bundle import sha256_file

    dst = tmp_path / "b"
    shutil.copytree(built.path, dst)
    engines = dst / "engines/ort-cpu"
    m = json.loads((engines / "manifest.json").read_text())
    rel = built.graph("jacobi", 0)["file"]
    shutil.copy(engines / built.graph("step_rows", 0)["file"], engines / rel)
    m["files"][rel] = sha256_file(engines / rel)
    (engines / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="not a jacobi graph of this bundle"):
        OrtSessions(load_bundle(dst)).get("jacobi", 0)
    assert main(["sample", str(dst), "-n", "1", "--plan", "ujd"]) == 2
    assert "not a jacobi graph of this bundle" in capsys.readouterr().err


@pytest.mark.skipif(unavailable_reason("ort-cuda") is None, reason="onnxruntime-gpu is installed here")
def test_missing_gpu_backend_is_a_clear_error(built, capsys):
    with pytest.raises(BackendUnavailable, match="backend ort-cuda not available: .*CUDAExecutionProvider"):
        build_ort(built, "ort-cuda")
    assert main(["build", str(built.path), "--backend", "ort-trt"]) == 2
    assert "not available" in capsys.readouterr().err


def test_gpu_backends_say_why_they_are_not_available_here():
    import subprocess
    import sys

    from sejd.engines import unavailable
    if unavailable("torch-cuda") is None:
        pytest.skip("a CUDA device is visible: covered by the GPU checks")
    for backend in ("tensorrt", "torch-cuda", "ort-cuda"):
        assert "CUDA" in unavailable(backend) or "not installed" in unavailable(backend)
    # importing sejd pulls in no GPU package
    code = "import sys, sejd, sejd.cli, sejd.engines; print([m for m in ('tensorrt', 'cuda', 'pycuda') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_unknown_backend_is_refused(built, capsys):
    assert main(["build", str(built.path), "--backend", "metal"]) == 2
    assert "unknown backend 'metal'" in capsys.readouterr().err


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_per_sample_stopping_on_ort_matches_pytorch(built, guidance):
    model = built.load_model()
    plan = named_plan("ujd", 4, tau=0.01)
    for b in plan.blocks:
        b.per_sample = True
    noise = torch.randn(4, 16, 12, generator=torch.Generator().manual_seed(9)) * 2
    kw = dict(labels=torch.tensor([0, 1, 2, 3]), plan=plan, guidance=guidance, progress=False)
    ref = sample(model, noise, **kw)
    got = sample(model, noise, runners=ort_runners(built), **kw)
    torch.testing.assert_close(got.images, ref.images, atol=1e-4, rtol=0)
    assert [b.sample_iterations for b in got.stats.blocks] == [b.sample_iterations for b in ref.stats.blocks]


@pytest.fixture(scope="module")
def bundle64(tmp_path_factory):
    """T = 64: long enough that frozen-prefix windows start past the first aligned window."""
    from sejd import save_checkpoint
    from sejd.export.exporter import export_bundle
    from tests.conftest import make_model
    root = tmp_path_factory.mktemp("b64")
    save_checkpoint(make_model(img_size=16, num_classes=0), root / "ckpt")
    b = export_bundle(root / "ckpt", root / "bundle", variants=["step_rows", "window", "jacobi"], show_progress=False)
    build_ort(b, "ort-cpu", show_progress=False)
    return b


@pytest.mark.parametrize("tau", [0.0, 1e-3])
def test_frozen_prefix_on_ort_matches_pytorch(bundle64, tau):
    model = bundle64.load_model()
    plan = named_plan("ujd", 4, tau=tau)
    for b in plan.blocks:
        b.freeze = True
    noise = torch.randn(2, 64, 12, generator=torch.Generator().manual_seed(4))
    ref = sample(model, noise, plan=plan, progress=False)
    got = sample(model, noise, plan=plan, runners=ort_runners(bundle64), progress=False)
    torch.testing.assert_close(got.images, ref.images, atol=1e-4, rtol=0)
    if tau == 0:
        exact = sample(model, noise, plan="sequential", progress=False)
        torch.testing.assert_close(got.images, exact.images, atol=1e-4, rtol=0)


def test_batch_above_the_bundles_batch_max_is_refused(built):
    from sejd.runtime.runner import Conditioning
    runner = ort_runners(built)[0]
    limit = built.manifest["batch_max"]
    with pytest.raises(InputError, match=f"exceeds the bundle's batch_max {limit}"):
        runner.begin(limit + 1, Conditioning.build(limit + 1, 16))


def test_built_engines_store_their_weights_once_per_block(built):
    import onnx

    from sejd.engines import engine_dir
    from sejd.export.weights import all_tensors

    folder = engine_dir(built, "ort-cpu")
    m = json.loads((folder / "manifest.json").read_text())
    assert not list(folder.rglob("*.data"))  # ONNX Runtime's per-graph initializer files were merged
    for k in range(built.config.num_blocks):
        assert f"blocks/{k}/weights.bin" in m["files"]
        for g in [g for g in built.manifest["graphs"] if g["block"] == k]:
            model = onnx.load(folder / g["file"], load_external_data=False)
            locations = {e.value for t in all_tensors(model) for e in t.external_data if e.key == "location"}
            assert locations == {"weights.bin"}, g["file"]
    # the engines add at most 1.2x the bundle's weights (every variant's own copy: 7x)
    assert m["weights"]["weight_bytes"] <= 1.2 * built.manifest["weights"]["weight_bytes"]


def test_a_missing_engine_weight_file_is_refused_by_name(built, tmp_path):
    import shutil
    dst = tmp_path / "b"
    shutil.copytree(built.path, dst)
    (dst / "engines/ort-cpu/blocks/1/weights.bin").unlink()
    with pytest.raises(BundleError, match="engines/ort-cpu/blocks/1/weights.bin is missing"):
        ort_runners(load_bundle(dst))
