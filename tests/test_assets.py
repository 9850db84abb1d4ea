"""The models shipped in the package: they load, score what they recorded, and sample sanely."""

import pytest
import torch

from sejd import load_checkpoint, sample
from sejd.model.checkpoint import builtin_names
from sejd.workflows.data import load_dataset
from sejd.workflows.train import evaluate_bpd

SHIPPED = ["digits", "textures"]


def test_both_models_are_shipped_and_small():
    assert set(SHIPPED) <= set(builtin_names())
    from sejd.model.checkpoint import BUILTIN_DIR
    size = sum(f.stat().st_size for f in BUILTIN_DIR.rglob("*") if f.is_file())
    assert size <= 25 * 2**20


@pytest.mark.parametrize("name", SHIPPED)
def test_heldout_bits_per_dim_matches_the_recorded_figure(name):
    model = load_checkpoint(f"builtin:{name}")
    training = model.meta["training"]
    x, y = load_dataset(model.meta["dataset"]).heldout()
    bpd = evaluate_bpd(model, x, y, training["noise_std"])
    assert abs(bpd - training["heldout_bpd"]) <= 0.05
    assert model.noise_std == training["noise_std"] > 0


@pytest.mark.parametrize("name", SHIPPED)
def test_sequential_sample_is_finite_and_in_range(name):
    model = load_checkpoint(f"builtin:{name}")
    cfg = model.config
    noise = torch.randn(4, cfg.num_tokens, cfg.token_dim, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4) % cfg.num_classes if cfg.num_classes else None
    images = sample(model, noise, labels=labels, plan="sequential", progress=False).images
    assert images.shape == (4, cfg.in_channels, cfg.img_size, cfg.img_size)
    assert bool(torch.isfinite(images).all())
    assert images.min() > -2 and images.max() < 2  # data in [-1, 1] plus the training noise
    assert images.std() > 0.1  # structure, not a constant image


def test_digits_is_class_conditional_and_guidance_changes_samples():
    model = load_checkpoint("builtin:digits")
    assert model.config.num_classes == 10 and model.config.num_blocks >= 4
    noise = torch.randn(2, model.config.num_tokens, model.config.token_dim, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([3, 7])
    plain = sample(model, noise, labels=labels, plan="sequential", progress=False).images
    guided = sample(model, noise, labels=labels, plan="sequential", guidance=2.0, progress=False).images
    assert (plain - guided).abs().max() > 0.05
