"""The torch-cuda runner (export graph modules + CUDA graphs). Here it runs eagerly on the CPU, which
checks everything but the capture itself against the PyTorch reference runner; on a GPU the same
tests run with CUDA graphs."""

import pytest
import torch

from sejd import sample
from sejd.engines import unavailable
from sejd.engines.torch_graphs import graph_runners
from sejd.runtime.plan import named_plan
from tests.conftest import make_model

DEVICE = "cuda" if unavailable("torch-cuda") is None else "cpu"


def plans():
    capped = named_plan("ujd", 4, tau=0.0)
    for b in capped.blocks:
        b.max_iters = 3
    frozen = named_plan("ujd", 4, tau=1e-3)
    for b in frozen.blocks:
        b.freeze = True
    per_sample = named_plan("ujd", 4, tau=0.01)
    for b in per_sample.blocks:
        b.per_sample = True
    return ["sequential", "ujd", "sjd", "gs-jacobi", capped, frozen, per_sample]


@pytest.mark.parametrize("plan", plans(), ids=["sequential", "ujd", "sjd", "gs-jacobi", "capped", "frozen",
                                               "per-sample"])
@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_graph_module_runner_matches_the_reference_runner(plan, guidance):
    model = make_model()
    noise = torch.randn(3, 16, 12, generator=torch.Generator().manual_seed(2))
    kw = dict(labels=torch.tensor([0, 3, -1]), plan=plan, guidance=guidance, progress=False)
    ref = sample(model, noise, **kw)
    dev_model = make_model().to(DEVICE)
    got = sample(dev_model, noise, runners=graph_runners(dev_model), **kw)
    assert got.images.device.type == "cpu"
    torch.testing.assert_close(got.images, ref.images, atol=1e-4, rtol=0)
    assert [b.iterations for b in got.stats.blocks] == [b.iterations for b in ref.stats.blocks]
