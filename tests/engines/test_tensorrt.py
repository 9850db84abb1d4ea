"""The TensorRT backend. Its shape and platform logic, and how its build is composed from Polygraphy's
loaders, are checked everywhere; building and running engines needs a CUDA device and the tensorrt
package, and those tests skip cleanly without them."""

import types

import pytest
import torch

from sejd import sample
from sejd.cli import main
from sejd.core.errors import SejdError
from sejd.engines import unavailable
from sejd.engines.tensorrt import (
    config_loader,
    network_loader,
    plan_file,
    platform_mismatch,
    profile_batches,
    trt_profiles,
)
from sejd.export.contracts import contract, profile_shapes
from tests.conftest import make_model

TRT_REASON = unavailable("tensorrt")


def test_profiles_cover_every_batch_and_are_tuned_for_latency_and_throughput():
    cfg = make_model().config
    shapes = profile_shapes(contract(cfg, "step_rows"), batch_max=64, opt_batch=1, num_tokens=cfg.num_tokens)
    assert shapes["x"] == ((1, 1, 12), (1, 1, 12), (64, 1, 12))
    assert shapes["past.0.key"] == ((1, 2, 16, 32), (1, 2, 16, 32), (128, 2, 16, 32))  # rows: up to 2x (guidance)
    assert "pos" not in shapes and "guidance" not in shapes  # static inputs need no profile
    window = profile_shapes(contract(cfg, "window"), 8, 8, cfg.num_tokens)["x"]
    assert window == ((1, 1, 12), (8, 8, 12), (8, 16, 12))
    assert profile_batches(64) == [1, 64] and profile_batches(1) == [1]


# the few tensorrt names the loaders are composed with: a stand-in, so the composition is checked without TensorRT
FAKE_TRT = types.SimpleNamespace(MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace-pool"),
                                 NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=3))


def test_each_graph_gets_polygraphy_profiles_from_its_contract():
    cfg = make_model().config
    profiles = trt_profiles(contract(cfg, "window"), batch_max=8, num_tokens=cfg.num_tokens)
    assert len(profiles) == 2  # tuned for batch 1 and for batch_max, both covering 1..batch_max
    for profile, opt in zip(profiles, (1, 8)):
        lo, mid, hi = profile["x"]
        assert (lo, mid, hi) == ((1, 1, 12), (opt, 8, 12), (8, 16, 12))
        assert tuple(profile["past.1.value"]) == ((1, 2, 16, 32), (opt, 2, 16, 32), (16, 2, 16, 32))
        assert "start" not in profile  # a plain input: TensorRT takes its static shape
    # inputs TensorRT makes shape tensors get value ranges; sejd knows them only for its scalar inputs
    shaped = trt_profiles(contract(cfg, "jacobi_loop"), 8, cfg.num_tokens, shape_tensors=["max_iters"])
    assert tuple(shaped[0]["max_iters"]) == ([0], [15], [15])
    with pytest.raises(SejdError, match=r"treats inputs \['x'\] of the step_rows graph as shape tensors"):
        trt_profiles(contract(cfg, "step_rows"), 8, cfg.num_tokens, shape_tensors=["x"])


def test_the_build_is_composed_from_polygraphys_loaders(tmp_path):
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath

    network = network_loader(FAKE_TRT, tmp_path / "blocks/0/jacobi.onnx")
    assert isinstance(network, NetworkFromOnnxPath)
    assert network.path == str(tmp_path / "blocks/0/jacobi.onnx") and network.strongly_typed is True
    no_flag = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace())  # always strongly typed
    assert network_loader(no_flag, tmp_path / "g.onnx").strongly_typed is False

    cfg = make_model().config
    profiles = trt_profiles(contract(cfg, "jacobi"), 8, cfg.num_tokens)
    (tmp_path / "timing.cache").write_bytes(b"cache")
    with open(tmp_path / "timing.cache", "rb") as timing:
        config = config_loader(FAKE_TRT, profiles, 512, timing, strip_weights=True)
        assert isinstance(config, CreateConfig)
        assert config.profiles is profiles and config.timing_cache_path is timing
        assert config.memory_pool_limits == {"workspace-pool": 512 << 20}
        assert config.strip_plan is True and config.refittable is False  # REFIT_IDENTICAL is added on the config
        assert (config.tf32, config.fp16, config.bf16) == (False, False, False)  # the types come from the graph
    plain = config_loader(FAKE_TRT, profiles, None, None, strip_weights=False)
    assert plain.memory_pool_limits is None and plain.timing_cache_path is None and plain.strip_plan is False


def test_engines_from_another_platform_are_refused_with_what_differs():
    here = {"tensorrt": "10.13.0", "gpu": "NVIDIA H200", "compute_capability": "9.0"}
    assert platform_mismatch(dict(here), here) is None
    msg = platform_mismatch({**here, "tensorrt": "10.9.0", "gpu": "NVIDIA A100"}, here)
    assert "tensorrt '10.9.0' (here: '10.13.0')" in msg and "gpu 'NVIDIA A100' (here: 'NVIDIA H200')" in msg
    assert plan_file("blocks/3/jacobi_k.onnx") == "blocks/3/jacobi_k.plan"


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT and a GPU are available here")
def test_tensorrt_says_why_it_cannot_run(tiny_bundle, capsys):
    assert "CUDA" in TRT_REASON or "tensorrt" in TRT_REASON
    assert main(["build", str(tiny_bundle.path), "--backend", "tensorrt", "--precision", "fp16"]) == 2
    assert "backend tensorrt not available" in capsys.readouterr().err


@pytest.mark.skipif(TRT_REASON is not None, reason=f"tensorrt backend unavailable: {TRT_REASON}")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_tensorrt_engines_pass_check_and_match_the_reference(tmp_path, precision):
    from sejd import save_checkpoint
    from sejd.engines import backend
    from sejd.export.exporter import export_bundle
    from sejd.runtime.plan import named_plan
    from sejd.workflows.check import check_bundle

    save_checkpoint(make_model(), tmp_path / "ckpt")
    bundle = export_bundle(tmp_path / "ckpt", tmp_path / "b", unroll=3, batch_max=8, show_progress=False)
    tensorrt = backend("tensorrt")[0]
    tensorrt.build(bundle, precision=precision, workspace=1024)
    assert (bundle.path / "engines/tensorrt-timing.cache").stat().st_size > 0
    report = check_bundle(bundle, "tensorrt", show_progress=False)
    assert report, report.summary()
    if precision == "fp32":
        runners = tensorrt.runners(bundle)
        noise = torch.randn(3, 16, 12, generator=torch.Generator().manual_seed(5))
        plan = named_plan("sjd", 4, tau=1e-3)
        for b in plan.blocks:
            b.variant = "loop" if b.decoder == "sequential" else "chunk"
        ref = sample(bundle.load_model(), noise, plan=plan, progress=False)
        for _ in range(2):  # the second run replays the captured graphs
            got = sample(runners[0].model, noise, plan=plan, runners=runners, progress=False)
            torch.testing.assert_close(got.images, ref.images, atol=1e-3, rtol=0)
