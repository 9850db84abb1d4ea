"""The device runner (torch-cuda's GraphModuleRunner: the STARFlow graph modules of sejd/export/starflow_graphs.py,
eager on the CPU here) sampling a tiny text-conditioned STARFlow equals the PyTorch runners (<= 1e-4)."""

import pytest
import torch

from sejd.core.errors import InputError
from sejd.engines.device_runner import GraphModuleRunner
from sejd.runtime.runner import Conditioning, KVCachePool
from sejd.runtime.sampler import sample
from tests.export.test_starflow_export import CFG, _model
from tests.model.test_starflow import _data


@pytest.fixture(scope="module")
def model():
    return _model()


def _runners(model):
    pool = KVCachePool()
    return [GraphModuleRunner(model, k, cuda_graphs=False, pool=pool) for k in range(model.config.num_blocks)]


@pytest.mark.parametrize("guidance", [0.0, 3.6])
@pytest.mark.parametrize("plan,kw", [("sequential", {}), ("sjd", {"tau": 1e-3}), ("starflow", {}),
                                     ("gs-jacobi", {"tau": 1e-3}), ("ujd", {"tau": 1e-3})])
def test_device_runner_sampling_equals_the_torch_path(model, plan, kw, guidance):
    noise, text, null = _data(CFG, seed=5)
    z = model.patchify(noise)
    got = sample(model, z, plan=plan, text=text, uncond_text=null, guidance=guidance, runners=_runners(model),
                 progress=False, **kw).images
    ref = sample(model, z, plan=plan, text=text, uncond_text=null, guidance=guidance, progress=False, **kw).images
    assert (got - ref).abs().max().item() <= 1e-4


def test_device_runner_refuses_wrong_text(model):
    runner = _runners(model)[2]
    with pytest.raises(InputError, match=r"\(2, 4, 12\).*got \(2, 4, 10\)"):
        runner.begin(2, Conditioning(torch.full((2,), -1), torch.ones(2), None, torch.zeros(2, 4, 10)))


def test_torch_cuda_check_modules_match_the_reference_eager_on_cpu(model):
    """What `sejd check --backend torch-cuda` compares (polygraphy_runners.module_runner), run eagerly here."""
    import numpy as np

    from sejd.engines.polygraphy_runners import module_runner
    from sejd.engines.torch_cuda import TorchCudaBackend
    from sejd.export.contracts import contract, dummy_inputs
    from sejd.export.oracle import reference_outputs

    every, runnable = TorchCudaBackend().checked_graphs(None, model.config)
    assert {g["variant"] for g in runnable if g["block"] == 2} >= {"prefix", "step_rows", "window", "jacobi"}
    assert not any(g["variant"] == "prefix" for g in runnable if g["block"] != 2)
    for g in runnable:
        c = contract(model.config, g["variant"], 3, block=g["block"])
        runner = module_runner(model, g["block"], c)
        runner.activate()
        for rows in (False, True):
            feeds = dummy_inputs(c, model.config, batch=2, cfg_rows=rows, seed=3)
            got, want = runner.infer(feeds), reference_outputs(model, g["block"], c, feeds)
            for name in c.output_names:
                np.testing.assert_allclose(got[name], want[name], atol=c.atol, rtol=0, err_msg=f"{g} {name}")
        runner.deactivate()
