"""The device runner over engine callables (what TensorRT and ONNX Runtime's GPU providers plug into),
run here over ONNX Runtime CPU sessions bound to torch tensors: every plan must match the PyTorch
reference, including the single-call loop engines and the unrolled jacobi_k."""

import pytest
import torch

from sejd import InputError, sample
from sejd.engines import unavailable
from sejd.engines.ort import ort_tensor_runners
from tests.engines.test_ort import plan_with


@pytest.mark.parametrize("plan", ["sequential", "ujd", "sjd", "gs-jacobi", ("sjd", "chunk"), ("sjd", "loop"),
                                  ("ujd", "loop")])
@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_engine_block_runner_matches_the_reference(tiny_bundle, plan, guidance):
    plan = plan_with(*plan) if isinstance(plan, tuple) else plan
    model = tiny_bundle.load_model()
    noise = torch.randn(3, 16, 12, generator=torch.Generator().manual_seed(4))
    kw = dict(labels=torch.tensor([1, -1, 4]), plan=plan, guidance=guidance, progress=False)
    ref = sample(model, noise, **kw)
    runners = ort_tensor_runners(tiny_bundle, "ort-cpu", "cpu")
    got = sample(runners[0].model, noise, runners=runners, **kw)
    torch.testing.assert_close(got.images, ref.images, atol=1e-4, rtol=0)
    assert [b.iterations for b in got.stats.blocks] == [b.iterations for b in ref.stats.blocks]


def test_engine_calls_check_the_contract_before_the_backend(tiny_bundle):
    runner = ort_tensor_runners(tiny_bundle, "ort-cpu", "cpu")[0]
    call = runner.call("jacobi")
    z = torch.zeros(2, 16, 12)
    with pytest.raises(InputError, match="input 'x' must have shape"):
        call(z, torch.zeros(2, 15, 12), *[torch.zeros(2, dtype=torch.long), torch.ones(2), torch.zeros(2, 16)])
    with pytest.raises(InputError, match="must be float32, got float64"):
        call(z, z.double(), torch.zeros(2, dtype=torch.long), torch.ones(2), torch.zeros(2, 16))


@pytest.mark.skipif(unavailable("ort-cuda") is not None, reason=f"ort-cuda unavailable: {unavailable('ort-cuda')}")
@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt"])
def test_ort_gpu_providers_pass_check_with_device_io(tmp_path, backend):
    if unavailable(backend):
        pytest.skip(unavailable(backend))
    from sejd import save_checkpoint
    from sejd.engines import backend as find_backend
    from sejd.engines.ort import build_ort
    from sejd.export.exporter import export_bundle
    from sejd.workflows.check import check_bundle
    from tests.conftest import make_model

    save_checkpoint(make_model(), tmp_path / "ckpt")
    bundle = export_bundle(tmp_path / "ckpt", tmp_path / "b", unroll=3, batch_max=8, show_progress=False)
    build_ort(bundle, backend, show_progress=False)
    assert check_bundle(bundle, backend, show_progress=False)
    runners = find_backend(backend)[0].runners(bundle)
    assert runners[0].device.type == "cuda"  # caches and iterates live on the GPU


def test_runners_of_one_model_share_one_kv_cache_pool(tiny_bundle):
    """ONNX Runtime's CPU runner (both ping-pong sets) and the device runner: every block's caches are
    views of the same buffers, and a block decodes the same after another block used them."""
    from sejd.engines.ort import ort_runners
    from sejd.runtime.runner import Conditioning
    from tests.runtime.test_cache_pool import assert_block_unaffected_by_others

    cond = Conditioning.build(2, 16, guidance=1.0)
    for runners, caches in ((ort_runners(tiny_bundle), lambda r: r._caches[0] + r._caches[1]),
                            (ort_tensor_runners(tiny_bundle, "ort-cpu", "cpu"), lambda r: r.caches)):
        pointers = []
        for r in runners:
            r.begin(2, cond)
            pointers.append([a.ctypes.data if hasattr(a, "ctypes") else a.data_ptr() for a in caches(r)])
        assert all(p == pointers[0] for p in pointers) and len(set(pointers[0])) == len(pointers[0])
        assert_block_unaffected_by_others(runners)


def test_one_call_names_what_the_device_runner_runs_as_one_engine_call(tiny_bundle):
    """`sejd tune` times the chunk and loop variants only where a runner runs them as one call (no CUDA
    graphs on this CPU device runner: only the exported graphs count)."""
    runner = ort_tensor_runners(tiny_bundle, "ort-cpu", "cpu")[0]  # the tiny bundle has every variant
    assert runner.one_call == {"jacobi_chunk", "jacobi_loop", "sequential_loop"}
    runner.exported -= {"jacobi_loop", "sequential_loop"}
    assert runner.one_call == {"jacobi_chunk"}  # jacobi_k is loaded once, at construction
    runner.jacobi_k = None
    assert runner.one_call == frozenset()
