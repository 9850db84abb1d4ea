"""The torch-cuda runner (export graph modules + CUDA graphs). Here it runs eagerly on the CPU, which
checks everything but the capture itself against the PyTorch reference runner; on a GPU the same
tests run with CUDA graphs."""

import pytest
import torch

from sejd import sample
from sejd.engines import unavailable
from sejd.engines.torch_cuda import graph_runners
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
    looped = named_plan("sjd", 4, tau=1e-3)
    for b in looped.blocks:
        b.variant = "loop"  # sequential_loop (one captured graph per block) and jacobi_loop
    chunked = named_plan("ujd", 4, tau=1e-3)
    for b in chunked.blocks:
        b.variant, b.chunk = "chunk", 3
    return ["sequential", "ujd", "sjd", "gs-jacobi", capped, frozen, per_sample, looped, chunked]


PLAN_IDS = ["sequential", "ujd", "sjd", "gs-jacobi", "capped", "frozen", "per-sample", "loop", "chunk"]


@pytest.mark.parametrize("plan", plans(), ids=PLAN_IDS)
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


def test_runners_are_reused_across_batches_with_new_inputs():
    """Static buffers and captured graphs are kept per batch shape: a second batch of the same shape,
    and a batch of another shape, must each give their own reference result."""
    model = make_model()
    dev_model = make_model().to(DEVICE)
    runners = graph_runners(dev_model)
    plan = named_plan("sjd", 4, tau=1e-3)
    for b in plan.blocks:
        b.variant = "loop" if b.decoder == "sequential" else "chunk"
    # (1, guidance) has 2 rows like (2, no guidance): same caches, other input shapes
    for batch, seed, guidance in ((2, 0, 0.0), (2, 1, 0.0), (3, 2, 0.0), (1, 4, 1.5), (2, 3, 0.0), (1, 5, 1.5)):
        noise = torch.randn(batch, 16, 12, generator=torch.Generator().manual_seed(seed))
        kw = dict(labels=torch.arange(batch) % 5, plan=plan, guidance=guidance, progress=False)
        ref = sample(model, noise, **kw)
        got = sample(dev_model, noise, runners=runners, **kw)
        torch.testing.assert_close(got.images, ref.images, atol=1e-4, rtol=0)
    if DEVICE == "cuda":  # one capture per (batch shape, graph), replayed by the later batches
        assert set(runners[0]._state) == {2, 3}
        assert {"sequential_loop", "jacobi_chunk8"} & {name for name, _ in runners[0]._state[2][2]}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_runner_stays_within_its_parity_floor(precision):
    from sejd.workflows.check import PARITY_DB_BY_PRECISION
    from sejd.workflows.quality import psnr_db

    model = make_model()
    dev_model = make_model().to(DEVICE)
    noise = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(6))
    kw = dict(labels=torch.tensor([1, 2]), plan="sequential", guidance=1.0, progress=False)
    ref = sample(model, noise, **kw)
    runners = graph_runners(dev_model, precision=precision)
    assert runners[0].jacobi.block.proj_in.weight.dtype != torch.float32  # really reduced
    got = sample(dev_model, noise, runners=runners, **kw)
    assert psnr_db(got.images, ref.images) >= PARITY_DB_BY_PRECISION[precision]
    assert got.images.dtype == torch.float32


def test_graph_runners_share_one_pool_and_recapture_only_when_it_grows():
    """Captured graphs hold the caches' addresses: they stay while the pool keeps its buffers (any block,
    any smaller batch) and are dropped when a larger batch reallocates it."""
    from sejd.runtime.runner import Conditioning
    from tests.runtime.test_cache_pool import assert_block_unaffected_by_others

    model = make_model().to(DEVICE)
    runners = graph_runners(model)
    T = model.config.num_tokens
    runners[0].begin(2, Conditioning.build(2, T))
    runners[0].graphs["captured"] = "over the pool's addresses"
    for r in runners:
        r.begin(1, Conditioning.build(1, T))  # fewer rows: views at the same addresses
        assert r.caches[0].data_ptr() == runners[0].caches[0].data_ptr()
    runners[0].begin(2, Conditioning.build(2, T))
    assert "captured" in runners[0].graphs
    runners[1].begin(3, Conditioning.build(3, T, guidance=1.0))  # 6 rows: the pool grows
    runners[0].begin(2, Conditioning.build(2, T))
    assert "captured" not in runners[0].graphs
    assert_block_unaffected_by_others(runners)
