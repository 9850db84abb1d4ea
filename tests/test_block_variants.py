"""A change to the flow block is one edit of its declaration (sejd/model/block.py). For a block whose MLP has
another width and a block without biases (tests/conftest.py, `OTHER_BLOCKS`), the whole path holds: export,
build for ort-cpu, `sejd check`, and sampling on every backend that runs here against the PyTorch reference
and ml-tarflow's own loop. Per-graph parity for these blocks is in tests/export/test_export.py, the native
step's in tests/engines/test_native.py, the fused step graph's in tests/engines/test_ort_fused_step.py."""

import json
import shutil

import pytest
import torch

from sejd import sample, save_checkpoint
from sejd.engines import native
from sejd.engines.ort import FUSED_PATH, STEP_ROWS_PATH, build_ort, ort_runners
from sejd.engines.torch_cuda import graph_runners
from sejd.export.contracts import VARIANTS
from sejd.export.exporter import export_bundle
from sejd.workflows.check import check_bundle
from tests.conftest import OTHER_BLOCKS, make_model

ATOL = 1e-4  # a whole sample on the engines against the same plan on the PyTorch reference (fp32 graphs: 1e-4)


@pytest.fixture(scope="module", params=list(OTHER_BLOCKS))
def built(request, tmp_path_factory):
    """(the model, its bundle exported and built for ort-cpu)."""
    root = tmp_path_factory.mktemp(request.param)
    model = make_model(**OTHER_BLOCKS[request.param])
    save_checkpoint(model, root / "ckpt")
    bundle = export_bundle(root / "ckpt", root / "bundle", variants=VARIANTS, unroll=4, show_progress=False)
    build_ort(bundle, "ort-cpu", show_progress=False)
    return model, bundle


def test_the_bundle_carries_the_block_and_loads_it(built):
    model, bundle = built
    config = json.loads((bundle.path / "manifest.json").read_text())["config"]
    assert config == model.config.to_dict() and {"expansion", "bias"} <= set(config)
    assert json.loads((bundle.path / "model/config.json").read_text())["config"] == config
    loaded = bundle.load_model()
    assert loaded.config == model.config
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_sejd_check_passes_every_graph_the_native_step_and_the_fused_step(built):
    model, bundle = built
    report = check_bundle(bundle, "ort-cpu", show_progress=False)  # `sejd check BUNDLE --backend ort-cpu`
    assert report, report.summary()
    checks = {c.name: c for c in report.checks}
    for k in range(model.config.num_blocks):
        names = [f"block {k} {v}" for v in VARIANTS if v != "forward"] + [f"block {k} step_fused"]
        assert set(names) <= set(checks) and all(checks[n].passed and checks[n].enforced for n in names), k
        if native_step_expected():
            assert f"block {k} native step" in checks
    assert "forward" in checks and any("same plan" in name for name in checks)


def native_step_expected() -> bool:
    """The install builds the native step wherever a C compiler is (the project's machines have one)."""
    return native.available() is None or bool(shutil.which("cc") or shutil.which("gcc"))


@pytest.mark.parametrize("plan", ["sequential", "sjd"])
def test_sampling_matches_pytorch_on_every_backend(built, monkeypatch, plan):
    model, bundle = built
    noise = torch.randn(3, model.config.num_tokens, model.config.token_dim, generator=torch.Generator().manual_seed(6))
    kw = dict(labels=torch.tensor([0, -1, 3]), guidance=1.0, attn_temp=0.8, progress=False)
    want = sample(model, noise, plan=plan, **kw).images
    if plan == "sequential":  # the PyTorch reference against ml-tarflow's own loop (an independent statement)
        torch.testing.assert_close(sample(model, noise, plan="reference", **kw).images, want, atol=ATOL, rtol=0)

    def same(name, runners):
        got = sample(model, noise, plan=plan, runners=runners, **kw).images
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")

    same("torch-cuda's graph modules (eager here)", graph_runners(model, cuda_graphs=False))
    if native_step_expected():
        runners = ort_runners(bundle)
        assert {r.single_token_path.split(" (")[0] for r in runners} == {"native CPU step"}
        same("ort-cpu, native step", runners)
    monkeypatch.setenv("SEJD_NATIVE_STEP", "0")
    runners = ort_runners(bundle)
    assert {r.single_token_path for r in runners} == {FUSED_PATH}  # shipped: it passed parity at build time
    same("ort-cpu, fused step graph", runners)
    for r in runners:
        r.fused = None  # the exported step_rows graph instead
    assert {r.single_token_path for r in runners} == {STEP_ROWS_PATH}
    same("ort-cpu, step_rows graph", runners)
