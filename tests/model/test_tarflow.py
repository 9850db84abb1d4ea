
import pytest
import torch

from sejd.core.errors import ConfigError
from sejd.model.block import run_layer
from sejd.model.tarflow import TarFlow, TarFlowConfig
from sejd.runtime.sampler import sample
from tests.conftest import OTHER_BLOCKS, data_like, make_model, rms_norm_spec
from tests.model import mltarflow_oracle

ATOL = 1e-5  # float32 round-off between two orderings of the same maths


@pytest.mark.parametrize("overrides", [{}, {"nvp": False}, {"num_classes": 0}, {"num_blocks": 3, "patch_size": 1},
                                       *OTHER_BLOCKS.values()])
@pytest.mark.parametrize("labels", [None, [0, 4, -1]])
def test_forward_matches_ml_tarflow_oracle(overrides, labels):
    model = make_model(**overrides)
    x = data_like(model, 3)
    y = torch.tensor(labels) if labels is not None and model.config.num_classes else None
    z, outputs, logdets = model(x, y)
    z2, outputs2, logdets2 = mltarflow_oracle.forward(model.state_dict(), model.config.to_dict(), x, y)
    torch.testing.assert_close(z, z2, atol=ATOL, rtol=0)
    for a, b in zip(outputs, outputs2, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(logdets, logdets2, atol=ATOL, rtol=0)


def test_state_dict_keys_are_ml_tarflows():
    model = make_model(num_blocks=2, layers_per_block=1)
    expected = {"var"}
    for i in range(2):
        p = f"blocks.{i}."
        expected |= {p + k for k in ("proj_in.weight", "proj_in.bias", "pos_embed", "class_embed", "attn_mask",
                                     "proj_out.weight", "proj_out.bias")}
        for part in ("attention.norm", "attention.qkv", "attention.proj", "mlp.norm", "mlp.main.0", "mlp.main.2"):
            expected |= {f"{p}attn_blocks.0.{part}.{w}" for w in ("weight", "bias")}
    sd = model.state_dict()
    assert set(sd) == expected
    C, D, T = 64, 12, 16
    assert sd["blocks.0.attn_blocks.0.attention.qkv.weight"].shape == (3 * C, C)
    assert sd["blocks.1.class_embed"].shape == (5, 1, C)
    assert sd["blocks.0.proj_out.weight"].shape == (2 * D, C)
    assert sd["var"].shape == (T, D)
    torch.testing.assert_close(sd["blocks.0.attn_mask"], torch.tril(torch.ones(T, T)))


@pytest.mark.parametrize("overrides", [{}, {"num_classes": 0, "nvp": False}, *OTHER_BLOCKS.values()])
def test_the_block_declaration_is_what_each_block_holds(overrides):
    """Every tensor of every block is declared (name and shape) in sejd/model/block.py, and nothing else is:
    the native packing and the fused step graph read weights by these names."""
    model = make_model(**overrides)
    spec = model.config.block_spec
    declared = {**spec.parameters(), **spec.buffers()}
    for k, block in enumerate(model.blocks):
        assert block.spec == spec
        assert {name: tuple(t.shape) for name, t in block.state_dict().items()} == declared, k
    assert model.config.num_parameters == sum(p.numel() for p in model.parameters())


def test_a_block_without_biases_holds_none():
    sd = make_model(bias=False).state_dict()
    assert not [k for k in sd if k.endswith(".bias")]
    assert {k for k in make_model().state_dict() if k.endswith(".bias")}  # while ml-tarflow's blocks have them


def test_run_layer_refuses_an_op_it_does_not_know():
    """A declared op kind no executor implements fails loudly rather than being skipped."""
    model = make_model()
    spec = rms_norm_spec(model.blocks[0].spec)
    with pytest.raises(ValueError, match="unknown op kind 'rms_norm'"):
        run_layer(spec, model.blocks[0].attn_blocks[0], torch.zeros(1, 2, 64), None)


def test_patchify_is_channel_major_raster_order(model):
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.img_size, cfg.img_size)
    tokens = model.patchify(x)
    p, side = cfg.patch_size, cfg.img_size // cfg.patch_size
    for t in (0, 1, side, cfg.num_tokens - 1):
        py, px = divmod(t, side)
        patch = x[:, :, py * p:(py + 1) * p, px * p:(px + 1) * p]  # (B, C, p, p)
        torch.testing.assert_close(tokens[:, t], patch.reshape(2, -1))
    torch.testing.assert_close(model.unpatchify(tokens), x)


@pytest.mark.parametrize("overrides", [{}, {"nvp": False}, {"num_classes": 0}, *OTHER_BLOCKS.values()])
def test_forward_then_reverse_gives_back_the_input(overrides):
    model = make_model(**overrides)
    x = data_like(model, 2)
    y = torch.tensor([1, -1]) if model.config.num_classes else None
    z, _, _ = model(x, y)
    x_back = sample(model, z / model.var.sqrt(), labels=y, plan="sequential", progress=False).images
    torch.testing.assert_close(x_back, x, atol=1e-4, rtol=0)


def test_kept_sequence_has_one_image_per_block(model):
    z = torch.randn(2, model.config.num_tokens, model.config.token_dim)
    seq = sample(model, z, plan="sequential", keep_sequence=True, progress=False).sequence
    assert len(seq) == model.config.num_blocks + 1
    torch.testing.assert_close(seq[-1], sample(model, z, plan="sequential", progress=False).images)
    torch.testing.assert_close(seq[0], model.unpatchify(z))  # as ml-tarflow: the noise before the prior scale


def test_log_prob_is_minus_n_times_loss(model):
    x = data_like(model, 2)
    z, _, logdets = model(x)
    lp = model.log_prob(x)
    n = z[0].numel()
    torch.testing.assert_close(lp, -n * (0.5 * z.pow(2).mean(dim=[1, 2]) - logdets))
    assert lp.shape == (2,)


@pytest.mark.parametrize("bad", [dict(channels=65), dict(img_size=9), dict(patch_size=0), dict(num_classes=-1),
                                 dict(bias=1), dict(expansion=0)])
def test_bad_config_is_refused(bad):
    kw = dict(in_channels=3, img_size=8, patch_size=2, channels=64, num_blocks=2, layers_per_block=1, head_dim=32)
    kw.update(bad)
    with pytest.raises(ConfigError, match=next(iter(bad))):
        TarFlowConfig(**kw)


def test_model_carries_its_config(model):
    assert isinstance(model.config, TarFlowConfig) and model.config.num_tokens == 16
    assert TarFlow(model.config).config == model.config
