"""The TensorRT backend. Its shape and platform logic is checked everywhere; building and running
engines needs a CUDA device and the tensorrt package, and those tests skip cleanly without them."""

import pytest
import torch

from sejd import sample
from sejd.cli import main
from sejd.engines import unavailable
from sejd.engines.tensorrt import platform_mismatch, plan_file, profile_batches
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
    from sejd.check import check_bundle
    from sejd.engines import build_engines, runners_for
    from sejd.export.exporter import export_bundle
    from sejd.runtime.plan import named_plan

    save_checkpoint(make_model(), tmp_path / "ckpt")
    bundle = export_bundle(tmp_path / "ckpt", tmp_path / "b", unroll=3, batch_max=8, show_progress=False)
    build_engines(bundle, "tensorrt", type("O", (), {"precision": precision, "workspace": 1024})())
    assert (bundle.path / "engines/tensorrt-timing.cache").stat().st_size > 0
    report = check_bundle(bundle, "tensorrt", show_progress=False)
    assert report, report.summary()
    if precision == "fp32":
        runners = runners_for(bundle, "tensorrt")
        noise = torch.randn(3, 16, 12, generator=torch.Generator().manual_seed(5))
        plan = named_plan("sjd", 4, tau=1e-3)
        for b in plan.blocks:
            b.variant = "loop" if b.decoder == "sequential" else "chunk"
        ref = sample(bundle.load_model(), noise, plan=plan, progress=False)
        for _ in range(2):  # the second run replays the captured graphs
            got = sample(runners[0].model, noise, plan=plan, runners=runners, progress=False)
            torch.testing.assert_close(got.images, ref.images, atol=1e-3, rtol=0)
