import pytest
import torch

from sejd.core.errors import DecodeError, InputError
from sejd.runtime import decoders
from sejd.runtime.plan import BlockPlan
from sejd.runtime.runner import Conditioning
from sejd.runtime.torch_runner import torch_runners
from tests.conftest import data_like, make_model

EXACT = 1e-5  # float32 round-off between the cached-step and the parallel pass


def setup(k=0, batch=2, labels=None, **cfg):
    model = make_model(**cfg)
    runner = torch_runners(model)[k]
    z = model.blocks[k].permute(model.patchify(data_like(model, batch)))
    runner.begin(batch, Conditioning.build(batch, model.config.num_tokens, labels))
    return model, runner, z


def exact(runner, z):
    return decoders.sequential(runner, z).x


def test_sequential_inverts_the_forward_pass():
    model = make_model()
    x = model.patchify(data_like(model, 2))
    k = 1
    z, _ = model.blocks[k](x)  # forward of block k, image order
    runner = torch_runners(model)[k]
    runner.begin(2, Conditioning.build(2, model.config.num_tokens))
    out = decoders.sequential(runner, model.blocks[k].permute(z))
    torch.testing.assert_close(model.blocks[k].permute(out.x), x, atol=EXACT, rtol=0)
    assert out.iterations == model.config.num_tokens - 1


@pytest.mark.parametrize("init", ["zeros", "noise", "previous"])
def test_jacobi_with_tau_zero_runs_t_minus_1_iterations_to_the_exact_result(init):
    model, runner, z = setup()
    ref = exact(runner, z)
    x0 = decoders.initial_guess(init, z, torch.randn_like(z))
    out = decoders.jacobi(runner, z, x0, tau=0.0)
    assert out.iterations == model.config.num_tokens - 1 and out.converged
    torch.testing.assert_close(out.x, ref, atol=EXACT, rtol=0)


def test_converged_jacobi_equals_sequential_and_stops_early():
    model, runner, z = setup(k=3)
    ref = exact(runner, z)
    out = decoders.jacobi(runner, z, torch.zeros_like(z), tau=1e-6)
    assert out.iterations < model.config.num_tokens - 1
    assert out.residuals[-1] < 1e-6 and len(out.residuals) == out.iterations
    torch.testing.assert_close(out.x, ref, atol=1e-5, rtol=0)


def test_jacobi_residual_bounds_the_error_at_loose_tau():
    model, runner, z = setup(k=2)
    ref = exact(runner, z)
    out = decoders.jacobi(runner, z, torch.zeros_like(z), tau=0.05)
    assert out.residual < 0.05
    assert (out.x - ref).abs().max() < 0.5  # loose: not exact, but close


def test_capped_jacobi_finishes_exactly_with_sequential_steps():
    model, runner, z = setup()
    ref = exact(runner, z)
    out = decoders.jacobi(runner, z, torch.zeros_like(z), tau=0.0, max_iters=3)
    T = model.config.num_tokens
    assert not out.converged and out.iterations == 3 and out.sequential_steps == T - 1 - 3
    torch.testing.assert_close(out.x, ref, atol=EXACT, rtol=0)


@pytest.mark.parametrize("segments", [1, 3, 4, 15])
def test_gs_jacobi_equals_sequential(segments):
    model, runner, z = setup(k=1, labels=torch.tensor([2, -1]))
    ref = exact(runner, z)
    out = decoders.gs_jacobi(runner, z, torch.zeros_like(z), tau=0.0, segments=segments)
    torch.testing.assert_close(out.x, ref, atol=EXACT, rtol=0)
    assert out.iterations == model.config.num_tokens - 1  # tau = 0: every segment runs to exactness


def test_gs_jacobi_converged_stops_early():
    model, runner, z = setup(k=1)
    out = decoders.gs_jacobi(runner, z, torch.zeros_like(z), tau=1e-3, segments=2)
    assert out.iterations < model.config.num_tokens - 1 and out.residual < 1e-3
    torch.testing.assert_close(out.x, exact(runner, z), atol=1e-2, rtol=0)


def test_segment_bounds_cover_every_target_token_once():
    for T, S in [(16, 1), (16, 4), (17, 5), (4, 10)]:
        bounds = decoders.segment_bounds(T, S)
        covered = [t for a, b in bounds for t in range(a, b)]
        assert covered == list(range(1, T)) and all(b > a for a, b in bounds)


class NaNRunner:
    """Wraps a runner and poisons its output from the 2nd parallel call on."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.num_tokens, self.token_dim = inner.num_tokens, inner.token_dim

    def jacobi_iter(self, z, x, *a):
        self.calls += 1
        x_next, res = self.inner.jacobi_iter(z, x, *a)
        if self.calls >= 2:
            x_next[:, -1] = float("nan")
            res[:] = float("nan")
        return x_next, res


def test_nan_mid_decode_is_reported_not_looped_on():
    _, runner, z = setup()
    bad = NaNRunner(runner)
    with pytest.raises(DecodeError, match="non-finite values appeared in Jacobi iteration 2"):
        decoders.jacobi(bad, z, torch.zeros_like(z), tau=0.5)
    assert bad.calls == 2


def test_frozen_prefix_jacobi_is_exact_at_tau_zero_and_close_when_converged():
    model, runner, z = setup(k=2, batch=3)
    ref = exact(runner, z)
    out = decoders.jacobi(runner, z, torch.zeros_like(z), tau=0.0, freeze=True)
    assert out.iterations <= model.config.num_tokens - 1
    torch.testing.assert_close(out.x, ref, atol=EXACT, rtol=0)
    loose = decoders.jacobi(runner, z, torch.zeros_like(z), tau=1e-3, freeze=True)
    plain = decoders.jacobi(runner, z, torch.zeros_like(z), tau=1e-3)
    assert loose.residual < 1e-3 and (loose.x - ref).abs().max() < 1e-2
    assert loose.iterations <= plain.iterations + 1


class CountingRunner:
    """Counts the tokens each parallel call runs."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []
        self.num_tokens, self.token_dim = inner.num_tokens, inner.token_dim

    def jacobi_iter(self, z, x, start=1, end=None):
        self.tokens.append((end or self.num_tokens) - start)
        return self.inner.jacobi_iter(z, x, start, end)

    def project(self, x, start):  # commits of the frozen prefix: not counted
        return self.inner.project(x, start)


def test_frozen_prefix_shrinks_the_window_every_iteration(monkeypatch):
    monkeypatch.setattr(decoders, "FREEZE_ALIGN", 1)  # unaligned windows: the start moves every iteration
    _, runner, z = setup(k=1)
    counting = CountingRunner(runner)
    decoders.jacobi(counting, z, torch.zeros_like(z), tau=0.0, freeze=True)
    assert counting.tokens == sorted(counting.tokens, reverse=True) and len(set(counting.tokens)) == len(counting.tokens)
    assert counting.tokens[0] == 15


class LastTokenMovesRunner:
    """Every iteration leaves tokens alone except the last, which moves by 1.0 (T = 8)."""

    num_tokens, token_dim = 8, 2

    def jacobi_iter(self, z, x, start=1, end=None):
        x_next = x.clone()
        x_next[:, -1] += 1.0
        return x_next, (x_next - x)[:, start:].abs().amax(dim=(1, 2))

    def project(self, x, start):
        return torch.zeros_like(x), torch.zeros_like(x)


def test_frozen_prefix_reaching_the_end_is_converged_not_capped():
    z = torch.zeros(1, 8, 2)
    out = decoders.jacobi(LastTokenMovesRunner(), z, torch.zeros_like(z), tau=0.5, freeze=True)
    assert out.converged and out.sequential_steps == 0 and out.iterations == 2


class Bar:
    """Counts the steps a decoder reports to its progress bar."""

    def __init__(self):
        self.n = 0

    def update(self, steps):
        self.n += steps


def start_iterate(z):
    """A strategy's starting iterate, as `jacobi` hands it over: zeros with token 0 = z_0."""
    x = torch.zeros_like(z)
    x[:, 0] = z[:, 0]
    return x


def test_chunked_jacobi_checks_only_between_chunks_and_equals_host_iterations():
    model, runner, z = setup(k=2)
    T = model.config.num_tokens
    exact_run = decoders.jacobi_chunked(runner, z, start_iterate(z), 0.0, T - 1, chunk=4)
    assert exact_run.iterations == T - 1 and exact_run.converged  # chunks of 4, 4, 4 then the 3 left
    torch.testing.assert_close(exact_run.x, exact(runner, z), atol=EXACT, rtol=0)
    bar = Bar()
    out = decoders.jacobi_chunked(runner, z, start_iterate(z), 1e-2, T - 1, chunk=4, bar=bar)
    host = decoders.jacobi_host(runner, z, start_iterate(z), 1e-2, T - 1)
    assert out.iterations % 4 == 0 and host.iterations <= out.iterations < host.iterations + 4
    assert len(out.residuals) == out.iterations == bar.n and out.converged
    same = decoders.jacobi_host(runner, z, start_iterate(z), float("-inf"), out.iterations)
    torch.testing.assert_close(out.x, same.x, atol=EXACT, rtol=0)


def test_one_call_jacobi_equals_host_jacobi_and_reports_only_the_last_residual():
    model, runner, z = setup(k=1)
    bar = Bar()
    out = decoders.jacobi_one_call(runner, z, start_iterate(z), 1e-3, model.config.num_tokens - 1, bar)
    host = decoders.jacobi_host(runner, z, start_iterate(z), 1e-3, model.config.num_tokens - 1)
    assert out.iterations == host.iterations == bar.n and out.converged
    assert out.residuals == [host.residual]
    torch.testing.assert_close(out.x, host.x, atol=0, rtol=0)


def test_host_jacobi_stopped_by_its_cap_is_not_converged():
    _, runner, z = setup()
    out = decoders.jacobi_host(runner, z, start_iterate(z), 0.0, 3)
    assert out.iterations == 3 and not out.converged and out.sequential_steps == 0


def per_sample_setup(batch=3, guidance=1.5):
    model = make_model()
    T, D = model.config.num_tokens, model.config.token_dim
    runner = torch_runners(model)[1]
    z = torch.randn(batch, T, D, generator=torch.Generator().manual_seed(9)) * 4  # wide: samples stop apart
    cond = Conditioning.build(batch, T, torch.arange(batch), guidance=guidance)
    runner.begin(batch, cond)
    return runner, z, cond


def test_per_sample_jacobi_runs_each_sample_as_if_alone_and_ends_on_the_whole_batch():
    runner, z, cond = per_sample_setup()
    T = runner.num_tokens
    out = decoders.jacobi_per_sample(runner, z, start_iterate(z), 0.01, T - 1, cond)
    assert runner.batch == 3 and out.converged
    assert len(set(out.sample_iterations)) > 1 and out.iterations == max(out.sample_iterations)
    for i in range(3):
        runner.begin(1, cond.subset(torch.tensor([i]), 3))
        alone = decoders.jacobi_host(runner, z[i:i + 1], start_iterate(z[i:i + 1]), 0.01, T - 1)
        assert out.sample_iterations[i] == alone.iterations
        torch.testing.assert_close(out.x[i:i + 1], alone.x, atol=1e-5, rtol=0)


def test_finish_capped_finishes_only_the_given_samples_exactly():
    runner, z, cond = per_sample_setup()
    T = runner.num_tokens
    capped = decoders.jacobi_host(runner, z, start_iterate(z), 0.0, 4)
    before = capped.x.clone()
    done = decoders.finish_capped(runner, z, capped, torch.tensor([1]), cond)
    assert runner.batch == 3 and not done.converged and done.sequential_steps == T - 1 - 4
    torch.testing.assert_close(capped.x, before, atol=0, rtol=0)  # the capped run's result is not changed
    torch.testing.assert_close(done.x[[0, 2]], before[[0, 2]], atol=0, rtol=0)
    runner.begin(3, cond)
    torch.testing.assert_close(done.x[1], exact(runner, z)[1], atol=EXACT, rtol=1e-5)  # values up to ~24
    with pytest.raises(InputError, match="needs the batch's Conditioning"):
        decoders.finish_capped(runner, z, capped, torch.tensor([1]), None)


def test_per_sample_stopping_is_the_flag_not_the_conditioning():
    runner, z, cond = per_sample_setup()
    plain = decoders.jacobi(runner, z, torch.zeros_like(z), 0.01, cond=cond)
    assert plain.sample_iterations is None  # cond alone does not switch per-sample stopping on
    own = decoders.jacobi(runner, z, torch.zeros_like(z), 0.01, per_sample=True, cond=cond)
    assert len(own.sample_iterations) == 3
    by_plan = decoders.decode_block(runner, z, BlockPlan("jacobi", tau=0.01, per_sample=True), z, cond=cond)
    assert by_plan.sample_iterations == own.sample_iterations
    with pytest.raises(InputError, match="needs the batch's Conditioning"):
        decoders.jacobi(runner, z, torch.zeros_like(z), 0.01, per_sample=True)
    with pytest.raises(InputError, match="needs variant 'host' without freeze, got variant 'chunk'"):
        decoders.jacobi(runner, z, torch.zeros_like(z), 0.01, variant="chunk", per_sample=True, cond=cond)


def test_sequential_in_one_call_equals_stepping():
    model, runner, z = setup(k=3)
    bar = Bar()
    out = decoders.sequential_one_call(runner, z, bar)
    assert out.iterations == out.sequential_steps == bar.n == model.config.num_tokens - 1
    torch.testing.assert_close(out.x, exact(runner, z), atol=0, rtol=0)
