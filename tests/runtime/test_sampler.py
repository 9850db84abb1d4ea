import pytest
import torch

from sejd import DecodeError, InputError, PlanError, sample
from sejd.runtime.plan import named_plan
from sejd.runtime.sampler import self_denoise
from tests.conftest import data_like, make_model

PLANS = ["reference", "sequential", "ujd", "sjd", "gs-jacobi"]


def encode(model, x, labels=None):
    """Images -> prior noise: the model's forward pass, divided by the prior's std."""
    z, _, _ = model(x, labels)
    return z / model.var.sqrt()


@pytest.mark.parametrize("plan", PLANS)
def test_every_plan_decodes_the_forward_pass_exactly_at_tau_zero(plan):
    model = make_model()
    x = data_like(model, 3)
    labels = torch.tensor([0, 4, -1])
    result = sample(model, encode(model, x, labels), labels=labels, plan=plan, tau=None if plan in
                    ("reference", "sequential") else 0.0, progress=False)
    torch.testing.assert_close(result.images, x, atol=1e-4, rtol=0)
    stats = result.stats
    assert [b.block for b in stats.blocks] == [3, 2, 1, 0] and [b.order for b in stats.blocks] == [0, 1, 2, 3]
    assert all(b.iterations == model.config.num_tokens - 1 and b.seconds > 0 for b in stats.blocks)


def test_sjd_plan_runs_first_sampling_block_sequentially_and_reports_iterations():
    model = make_model()
    noise = torch.randn(2, model.config.num_tokens, model.config.token_dim, generator=torch.Generator().manual_seed(0))
    result = sample(model, noise, plan="sjd", progress=False)
    decoders = [b.decoder for b in result.stats.blocks]
    assert decoders == ["sequential", "jacobi", "jacobi", "jacobi"]
    jac = result.stats.blocks[1:]
    assert all(1 <= b.iterations < model.config.num_tokens - 1 and b.residual < 0.5 for b in jac)
    assert "plan sjd" in result.stats.table() and result.stats.to_dict()["blocks"][0]["decoder"] == "sequential"


@pytest.mark.parametrize("plan", ["sequential", "ujd", "gs-jacobi"])
def test_cfg_in_one_batch_matches_ml_tarflows_two_pass_loop(plan):
    model = make_model()
    labels = torch.tensor([1, 2, 3])
    noise = torch.randn(3, model.config.num_tokens, model.config.token_dim, generator=torch.Generator().manual_seed(5))
    kw = dict(labels=labels, guidance=1.5, guide_what="ab", attn_temp=0.8, annealed_guidance=True, progress=False)
    two_pass = sample(model, noise, plan="reference", **kw)
    one_batch = sample(model, noise, plan=plan, tau=None if plan == "sequential" else 0.0, **kw)
    torch.testing.assert_close(one_batch.images, two_pass.images, atol=1e-4, rtol=0)
    unguided = sample(model, noise, labels=labels, plan="reference", progress=False)
    assert (unguided.images - two_pass.images).abs().max() > 1e-3  # guidance did something


def test_sequential_matches_reference_loop_with_ml_tarflow_arguments():
    model = make_model()
    z = torch.randn(2, model.config.num_tokens, model.config.token_dim, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1])
    ours = sample(model, z.clone(), labels=y, plan="sequential", guidance=2.0, guide_what="a", attn_temp=0.9,
                  progress=False).images
    ref = sample(model, z, labels=y, plan="reference", guidance=2.0, guide_what="a", attn_temp=0.9, progress=False)
    torch.testing.assert_close(ours, ref.images, atol=1e-4, rtol=0)


def test_self_denoise_moves_up_the_likelihood_per_sample():
    model = make_model(num_classes=0)
    x = data_like(model, 3)
    den = self_denoise(model, x, noise_std=0.05)
    assert (den - x).abs().max() > 0
    assert bool((model.log_prob(den) > model.log_prob(x)).all())
    one = self_denoise(model, x[1:2], noise_std=0.05)  # samples are independent
    torch.testing.assert_close(den[1:2], one, atol=1e-5, rtol=0)


def test_denoise_option_of_sampling_needs_a_noise_std():
    model = make_model(num_classes=0)
    noise = torch.randn(1, model.config.num_tokens, model.config.token_dim)
    with pytest.raises(InputError, match="noise std"):
        sample(model, noise, plan="sequential", denoise=True, progress=False)
    model.noise_std = 0.05
    plain = sample(model, noise, plan="sequential", progress=False)
    den = sample(model, noise, plan="sequential", denoise=True, progress=False)
    torch.testing.assert_close(den.images, self_denoise(model, plain.images), atol=1e-5, rtol=0)
    assert den.stats.denoise_seconds > 0


def test_bad_noise_and_labels_are_refused(model):
    T, D = model.config.num_tokens, model.config.token_dim
    with pytest.raises(InputError, match=r"shape \(batch, 16, 12\).*got \(2, 16, 11\)"):
        sample(model, torch.randn(2, T, D - 1), progress=False)
    with pytest.raises(InputError, match="got \\(16, 12\\)"):
        sample(model, torch.randn(T, D), progress=False)
    nan = torch.randn(2, T, D)
    nan[1, 3, 4] = float("nan")
    with pytest.raises(InputError, match="1 non-finite"):
        sample(model, nan, progress=False)
    with pytest.raises(InputError, match=r"labels must be in \[0, 4\] or -1.*\[5\]"):
        sample(model, torch.randn(2, T, D), labels=torch.tensor([0, 5]), progress=False)
    with pytest.raises(InputError, match=r"labels must have shape \(2,\)"):
        sample(model, torch.randn(2, T, D), labels=torch.tensor([0, 1, 2]), progress=False)
    with pytest.raises(InputError, match="integers"):
        sample(model, torch.randn(2, T, D), labels=torch.tensor([0.5, 1.0]), progress=False)
    with pytest.raises(InputError, match="integers"):
        sample(model, torch.randn(2, T, D), labels="ab", progress=False)
    with pytest.raises(InputError, match="must be float32.*float64"):
        sample(model, torch.randn(2, T, D, dtype=torch.float64), progress=False)
    with pytest.raises(InputError, match="batch >= 1"):
        sample(model, torch.randn(0, T, D), progress=False)
    with pytest.raises(InputError, match="guide_what"):
        sample(model, torch.randn(1, T, D), plan="reference", guidance=1.0, guide_what="c", progress=False)


def test_labels_on_unconditional_model_are_refused(uncond_model):
    T, D = uncond_model.config.num_tokens, uncond_model.config.token_dim
    with pytest.raises(InputError, match="unconditional"):
        sample(uncond_model, torch.randn(1, T, D), labels=torch.tensor([0]), progress=False)


def test_bad_plans_are_refused(model, tmp_path):
    noise = torch.randn(1, model.config.num_tokens, model.config.token_dim)
    with pytest.raises(PlanError, match="unknown plan 'fast'"):
        sample(model, noise, plan="fast", progress=False)
    with pytest.raises(PlanError, match="tau must be a number >= 0"):
        sample(model, noise, plan="sjd", tau=-1, progress=False)
    bad = named_plan("sjd", 4)
    bad.blocks[0].decoder = "magic"
    with pytest.raises(PlanError, match="block 0: unknown decoder 'magic'"):
        sample(model, noise, plan=bad, progress=False)
    with pytest.raises(PlanError, match="has 3 blocks, the model has 4"):
        sample(model, noise, plan=named_plan("sjd", 3), progress=False)


def test_plan_json_round_trips(model, tmp_path):
    import json
    plan = named_plan("gs-jacobi", 4, tau=0.25)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.to_dict()))
    noise = torch.randn(1, model.config.num_tokens, model.config.token_dim)
    a = sample(model, noise, plan=str(path), progress=False)
    b = sample(model, noise, plan=plan, progress=False)
    torch.testing.assert_close(a.images, b.images, atol=0, rtol=0)
    path.write_text(json.dumps({"blocks": [{"decoder": "jacobi", "speed": 9}] * 4}))
    with pytest.raises(PlanError, match="unknown fields \\['speed'\\]"):
        sample(model, noise, plan=str(path), progress=False)


def test_non_finite_model_output_is_a_decode_error():
    model = make_model(num_classes=0)
    with torch.no_grad():
        model.blocks[0].proj_out.bias.fill_(float("inf"))
    noise = torch.randn(1, model.config.num_tokens, model.config.token_dim)
    with pytest.raises(DecodeError, match="non-finite"):
        sample(model, noise, plan="sequential", progress=False)


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_per_sample_stopping_makes_each_sample_independent_of_its_batch(guidance):
    model = make_model()
    plan = named_plan("ujd", 4, tau=0.01)
    for b in plan.blocks:
        b.per_sample = True
    noise = torch.randn(4, 16, 12, generator=torch.Generator().manual_seed(9)) * 2  # wide: samples differ
    labels = torch.tensor([0, 1, 2, 3])
    kw = dict(plan=plan, guidance=guidance, progress=False)
    batch = sample(model, noise, labels=labels, **kw)
    for i in range(4):
        alone = sample(model, noise[i:i + 1], labels=labels[i:i + 1], **kw)
        torch.testing.assert_close(batch.images[i:i + 1], alone.images, atol=1e-5, rtol=0)
        for bs, als in zip(batch.stats.blocks, alone.stats.blocks):
            assert bs.sample_iterations[i] == als.iterations
    assert any(len(set(b.sample_iterations)) > 1 for b in batch.stats.blocks)  # samples did stop apart


def test_per_sample_stopping_needs_the_host_variant():
    plan = named_plan("ujd", 4)
    plan.blocks[0].per_sample, plan.blocks[0].variant = True, "loop"
    with pytest.raises(PlanError, match="per_sample needs variant 'host'"):
        plan.validate(4)


def test_per_sample_stopping_with_a_cap_finishes_only_the_capped_samples():
    model = make_model()
    plan = named_plan("ujd", 4, tau=0.01)
    for b in plan.blocks:
        b.per_sample, b.max_iters = True, 6
    noise = torch.randn(4, 16, 12, generator=torch.Generator().manual_seed(9)) * 2
    batch = sample(model, noise, plan=plan, progress=False)
    assert any(not b.converged for b in batch.stats.blocks)  # the cap was hit
    for i in range(4):
        alone = sample(model, noise[i:i + 1], plan=plan, progress=False)
        torch.testing.assert_close(batch.images[i:i + 1], alone.images, atol=1e-5, rtol=0)
