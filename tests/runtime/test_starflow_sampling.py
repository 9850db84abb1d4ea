"""Sampling a StarFlow through sejd's one sampler: Apple's block-wise Jacobi (plan "starflow") and its exact
reverse against the oracle (tests/model/starflow_oracle.py), and sejd's existing decoders on STARFlow blocks.

Tolerances: 1e-4 absolute (float32 round-off) against the oracle. PSNR on latents, as stated in `_psnr`:
20 log10(range of the reference latents / RMSE), range = max - min over the whole batch."""

import math

import pytest
import torch

from sejd.core.errors import InputError, PlanError
from sejd.model.starflow import StarFlowConfig
from sejd.model.starflow_checkpoint import build_starflow
from sejd.runtime.plan import BlockPlan, Plan, resolve_plan
from sejd.runtime.sampler import sample
from tests.model import starflow_oracle as so
from tests.model.test_starflow import TINY, VARIANTS, _data

ORACLE_SD = {name: so.random_state_dict(cfg, seed=0) for name, cfg in VARIANTS.items()}


def _model(name):
    return build_starflow(ORACLE_SD[name], StarFlowConfig.from_dict(VARIANTS[name]))


def _psnr(got, ref):
    rmse = (got - ref).pow(2).mean().sqrt().item()
    return math.inf if rmse == 0 else 20 * math.log10((ref.max() - ref.min()).item() / rmse)


def _run(model, noise, text, null, guidance, plan, **kw):
    return sample(model, model.patchify(noise), plan=plan, text=text, uncond_text=null, guidance=guidance,
                  progress=False, **kw)


def _oracle_text(text, null, guidance):
    return torch.cat([text, null]) if guidance and text is not None else text


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("guidance", [0.0, 3.6])
def test_starflow_plan_is_apples_jacobi_sampler(name, guidance):
    cfg = VARIANTS[name]
    if guidance and not cfg["txt_dim"]:
        pytest.skip("guidance needs text")
    if guidance and name == "r2l-exp-all-text":  # checked: the oracle's own exact reverse is NaN there
        pytest.skip("random weights with an unclipped exp scale, guided on every block, overflow")
    model = _model(name)
    noise, text, null = _data(cfg, seed=5)
    ref = so.jacobi_sample(ORACLE_SD[name], cfg, noise, _oracle_text(text, null, guidance), guidance,
                           block_size=16, threshold=1e-3, max_iters=32)
    got = _run(model, noise, text, null, guidance, "starflow")
    assert (got.images - ref).abs().max().item() <= 1e-4
    assert got.images.shape == noise.shape and all(b.decoder == "block-jacobi" for b in got.stats.blocks)
    # smaller windows than the sequence (16 tokens in windows of 5: 5, 5, 5, 1)
    ref = so.jacobi_sample(ORACLE_SD[name], cfg, noise, _oracle_text(text, null, guidance), guidance,
                           block_size=5, threshold=1e-3, max_iters=3)
    plan = Plan("windows", [BlockPlan("block-jacobi", block_size=5, threshold=1e-3, window_iters=3)
                            for _ in range(cfg["num_blocks"])])
    got = _run(model, noise, text, null, guidance, plan)
    assert (got.images - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("guidance", [0.0, 3.6])
def test_sequential_plan_is_apples_exact_reverse_and_inverts_the_forward(guidance):
    model = _model("t2i")
    x, text, null = _data(TINY, seed=6)
    ref = so.reverse_sample(ORACLE_SD["t2i"], TINY, x, _oracle_text(text, null, guidance), guidance)
    got = _run(model, x, text, null, guidance, "sequential").images
    assert (got - ref).abs().max().item() <= 1e-4
    if not guidance:
        z, _ = model(x, text)
        back = _run(model, z, text, null, 0.0, "sequential").images
        assert (back - x).abs().max().item() <= 1e-4


def test_guidance_moves_the_sample_and_identical_uncond_text_is_no_guidance():
    model = _model("t2i")
    noise, text, null = _data(TINY, seed=7)
    plain = _run(model, noise, text, None, 0.0, "sequential").images
    same = _run(model, noise, text, text, 3.6, "sequential").images
    assert (same - plain).abs().max().item() <= 1e-4
    guided = _run(model, noise, text, null, 3.6, "sequential").images
    assert (guided - plain).abs().max().item() > 1e-2
    # the unconditional text defaults to zeros (sejd has no text encoder to make Apple's encoding of "")
    zeros = _run(model, noise, text, None, 3.6, "sequential").images
    ref = so.reverse_sample(ORACLE_SD["t2i"], TINY, noise, torch.cat([text, torch.zeros_like(text)]), 3.6)
    assert (zeros - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("plan, tau", [("ujd", 0.0), ("sjd", 0.0), ("gs-jacobi", 0.0)])
@pytest.mark.parametrize("guidance", [0.0, 3.6])
def test_existing_decoders_reach_the_exact_sample(plan, tau, guidance):
    """tau 0 iterates to T - 1 (the exact answer): the decoders run STARFlow blocks unchanged."""
    model = _model("t2i")
    noise, text, null = _data(TINY, seed=8)
    seq = _run(model, noise, text, null, guidance, "sequential").images
    got = _run(model, noise, text, null, guidance, plan, tau=tau).images
    assert (got - seq).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fields", [{"freeze": True}, {"per_sample": True}, {"max_iters": 4},
                                    {"variant": "chunk", "chunk": 3}])
def test_jacobi_variants_on_starflow_blocks(fields):
    model = _model("t2i")
    noise, text, null = _data(TINY, seed=9)
    seq = _run(model, noise, text, null, 3.6, "sequential").images
    plan = Plan("v", [BlockPlan("jacobi", tau=1e-6, **fields) for _ in range(3)])
    got = _run(model, noise, text, null, 3.6, plan).images
    assert (got - seq).abs().max().item() <= 1e-4


@pytest.mark.parametrize("guidance", [0.0, 3.6])
def test_tuned_style_sjd_reaches_40_db_on_latents(guidance):
    """sjd with a tuned tolerance (tau 0.01 on max |x^t - x^(t-1)|) against the exact sequential sample."""
    model = _model("t2i")
    noise, text, null = _data(TINY, seed=10)
    seq = _run(model, noise, text, null, guidance, "sequential").images
    got = _run(model, noise, text, null, guidance, "sjd", tau=0.01)
    assert _psnr(got.images, seq) >= 40.0
    assert sum(b.iterations for b in got.stats.blocks) < 3 * 16  # and it did iterate less than sequential


def test_block_jacobi_with_enough_iterations_is_exact_on_tarflow_too():
    from sejd.model.tarflow import TarFlow, TarFlowConfig

    torch.manual_seed(0)
    model = TarFlow(TarFlowConfig(3, 8, 2, 32, 2, 2, head_dim=16)).eval()
    for b in model.blocks:
        torch.nn.init.normal_(b.proj_out.weight, std=0.02)
    noise = torch.randn(2, 16, 12)
    seq = sample(model, noise, plan="sequential", progress=False).images
    plan = Plan("exact", [BlockPlan("block-jacobi", block_size=6, threshold=0.0, window_iters=6) for _ in range(2)])
    got = sample(model, noise, plan=plan, progress=False).images
    assert (got - seq).abs().max().item() <= 1e-5 and (seq - model.unpatchify(noise)).abs().max().item() > 1e-2


@pytest.mark.parametrize("field, value", [("block_size", 0), ("block_size", "16"), ("threshold", -1.0),
                                          ("threshold", float("nan")), ("window_iters", 0), ("window_iters", True)])
def test_block_jacobi_plan_fields_are_validated(field, value):
    with pytest.raises(PlanError, match=field):
        resolve_plan(Plan("p", [BlockPlan("block-jacobi", **{field: value})]), 1)
    assert [b.decoder for b in resolve_plan("starflow", 3).blocks] == ["block-jacobi"] * 3


def test_sampling_inputs_are_refused_naming_expected_and_got():
    model = _model("t2i")
    noise, text, null = _data(TINY, seed=11)
    z = model.patchify(noise)
    with pytest.raises(InputError, match=r"\(2, 5, 12\)"):
        sample(model, z, text=text[..., :10], progress=False)
    with pytest.raises(InputError, match=r"uncond_text.*\(2, 5, 12\)"):
        sample(model, z, text=text, uncond_text=null[:, :3], guidance=2.0, progress=False)
    with pytest.raises(InputError, match="text-conditioned"):
        sample(model, z, progress=False)
    with pytest.raises(InputError, match="labels"):
        sample(model, z, labels=[0, 1], text=text, progress=False)
    with pytest.raises(InputError, match="reference"):
        sample(model, z, text=text, plan="reference", progress=False)
    with pytest.raises(InputError, match=r"\(batch, 16, 4\)"):
        sample(model, noise, text=text, progress=False)  # latents layout instead of tokens


def test_denoise_is_the_oracles_self_denoise():
    model = _model("t2i")
    model.noise_std = 0.3
    noise, text, null = _data(TINY, seed=12)
    got = _run(model, noise, text, null, 0.0, "sequential", denoise=True).images
    x = so.reverse_sample(ORACLE_SD["t2i"], TINY, noise, text)
    assert (got - so.self_denoise(ORACLE_SD["t2i"], TINY, x, text, 0.3)).abs().max().item() <= 1e-4
