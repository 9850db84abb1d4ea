"""Fixed-iteration plans: exactly N Jacobi iterations per block, no convergence test, no exact finish,
marked as timing only; and the peak resident memory reported with every sample."""

import resource

import pytest
import torch

from sejd import PlanError, sample
from sejd.runtime.plan import TIMING_ONLY, BlockPlan, Plan, named_plan
from sejd.workflows.bench import bench, table
from sejd.workflows.source import Session
from tests.conftest import make_model


def fixed_plan(counts, variant="host"):
    """SJD with fixed counts in sampling order after the sequential first block."""
    plan = named_plan("sjd", len(counts) + 1)
    for b, n in zip(reversed(plan.blocks[:-1]), counts):
        b.fixed_iters, b.variant, b.chunk = n, variant, 2
    plan.name = "sjd-fixed"
    return plan


def noise_for(model, batch=2):
    cfg = model.config
    return torch.randn(batch, cfg.num_tokens, cfg.token_dim, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("variant", ["host", "chunk"])
def test_fixed_iters_runs_exactly_n_iterations_and_is_marked_timing_only(variant):
    model = make_model()
    plan = fixed_plan([5, 2, 3], variant)
    for b in plan.blocks:
        b.tau = 1e6  # a convergence test would stop after one iteration
    result = sample(model, noise_for(model), plan=plan, progress=False)
    blocks = result.stats.blocks
    assert [b.iterations for b in blocks] == [15, 5, 2, 3]  # T - 1 sequential steps, then the fixed counts
    assert [len(b.residuals) for b in blocks[1:]] == [5, 2, 3]  # no sequential finish after the last one
    assert [b.converged for b in blocks] == [True, False, False, False]
    assert TIMING_ONLY in result.stats.plan and TIMING_ONLY in result.stats.table()
    assert "(fixed iterations)" in result.stats.table() and "finished exactly" not in result.stats.table()


def test_fixed_iters_at_t_minus_1_is_the_exact_result():
    model = make_model()
    noise = noise_for(model)
    exact = sample(model, noise, plan="sequential", progress=False).images
    got = sample(model, noise, plan=fixed_plan([15, 15, 15]), progress=False).images
    torch.testing.assert_close(got, exact, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fields, message", [
    ({"fixed_iters": 0}, "fixed_iters must be an int >= 1"),
    ({"fixed_iters": True}, "fixed_iters must be an int >= 1"),
    ({"fixed_iters": 2.0}, "fixed_iters must be an int >= 1"),
    ({"fixed_iters": 3, "variant": "loop"}, "needs decoder 'jacobi' with variant 'host' or 'chunk'"),
    ({"fixed_iters": 3, "freeze": True}, "neither freeze nor per_sample"),
    ({"fixed_iters": 3, "decoder": "gs-jacobi"}, "got decoder 'gs-jacobi'"),
])
def test_bad_fixed_iters_are_refused(fields, message):
    plan = Plan("p", [BlockPlan(**{"decoder": "jacobi", **fields})])
    with pytest.raises(PlanError, match=message):
        plan.validate(1)


def test_samples_report_the_peak_resident_memory_in_bytes():
    model = make_model()
    for plan in ("sjd", "reference"):
        stats = sample(model, noise_for(model), plan=plan, progress=False).stats
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert 10 * 2**20 < stats.peak_rss_bytes <= peak_kib * 1024  # bytes, not KiB
        assert stats.to_dict()["peak_rss_bytes"] == stats.peak_rss_bytes


def test_bench_measures_plan_objects_and_marks_fixed_ones_timing_only():
    model = make_model()
    result = bench(Session(model, None, "torch"), batches=(1,), decoders=["sjd", fixed_plan([2, 2, 2])], runs=1,
                   warmup=0, log=lambda *_: None)
    marks = {r["decoder"]: r["timing_only"] for r in result["runs"]}
    assert marks == {"sjd": False, "sjd-fixed": True}
    assert TIMING_ONLY in table(result) and "peak resident memory" in table(result)
