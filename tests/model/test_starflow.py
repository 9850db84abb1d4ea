"""sejd's STARFlow (sejd/model/starflow.py, the STARFlow options of sejd/model/block.py, the runtime's token
view) against the independent oracle of Apple's Model (tests/model/starflow_oracle.py), and the loader of
ml-starflow checkpoints (sejd/model/starflow_checkpoint.py). Tolerances: 1e-4 absolute in float32."""

import sys

import pytest
import torch

from sejd.core.errors import CheckpointError, ConfigError, InputError
from sejd.model.block import guide
from sejd.model.starflow import StarFlowConfig
from sejd.model.starflow_checkpoint import build_starflow, config_from_yaml, load_starflow
from sejd.runtime.decoders import sequential
from sejd.runtime.runner import Conditioning
from sejd.runtime.torch_runner import torch_runners
from tests.model import starflow_oracle as so

# 3 blocks, heterogeneous layers, a text prefix on the deep block only, 2 heads of 32 (rope: 4 row + 4 column
# + 8 text pairs), a 4x4 grid (16 tokens), L2R (blocks 0 and 2 flipped).
TINY = {"in_channels": 4, "img_size": 4, "patch_size": 1, "channels": 64, "num_blocks": 3, "layers_per_block": [1, 1, 2],
        "head_dim": 32, "rope": True, "sos": True, "txt_size": 5, "txt_dim": 12, "cond_top_only": True,
        "use_softplus": True, "use_final_norm": True, "soft_clip": 4.0, "seq_order": "L2R"}
VARIANTS = {
    "t2i": TINY,
    # R2L, exp scale, no clip, no final norm, text on every block (each block guided)
    "r2l-exp-all-text": {**TINY, "seq_order": "R2L", "use_softplus": False, "soft_clip": 0, "use_final_norm": False,
                         "cond_top_only": False},
    # no text at all: 2-D rope with 8 pairs per axis, patch 2 (token width 16)
    "no-text-patch2": {**TINY, "txt_size": 0, "txt_dim": 0, "img_size": 8, "patch_size": 2, "layers_per_block": [2]},
}
BUFFER_KEYS = ("attn_mask", "var", "feat_rope.")


def _apple_sd(cfg, seed=0, buffers=True):
    sd = so.random_state_dict(cfg, seed)
    return sd if buffers else {k: v for k, v in sd.items() if not any(b in k for b in BUFFER_KEYS)}


def _model(cfg, seed=0):
    return build_starflow(_apple_sd(cfg, seed), StarFlowConfig.from_dict(cfg))


def _data(cfg, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = cfg["img_size"]
    x = torch.randn(batch, cfg["in_channels"], s, s, generator=g)
    text = torch.randn(batch, cfg["txt_size"], cfg["txt_dim"], generator=g) if cfg["txt_dim"] else None
    null = torch.randn(batch, cfg["txt_size"], cfg["txt_dim"], generator=g) if cfg["txt_dim"] else None
    return x, text, null


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_matches_the_oracle(name):
    cfg = VARIANTS[name]
    model = _model(cfg)
    x, text, _ = _data(cfg)
    z_ref, ld_ref = so.forward(model_sd := _apple_sd(cfg), cfg, x, text)
    z, ld = model(x, text)
    assert (z - z_ref).abs().max().item() <= 1e-4
    assert (ld - ld_ref).abs().max().item() <= 1e-4
    assert (z - x).abs().max().item() > 0.1 and ld_ref.abs().min().item() > 0.1  # the flow really transforms
    assert "blocks.0.sos_embed" in model_sd
    # log_prob is -0.5 |z|^2 + log|det| per sample
    torch.testing.assert_close(model.log_prob(x, text), -0.5 * z_ref.pow(2).flatten(1).sum(1) + ld_ref,
                               atol=1e-3, rtol=1e-5)


def test_the_text_changes_only_the_text_block():
    cfg = TINY
    model = _model(cfg)
    x, text, other = _data(cfg)
    h = model.patchify(x)
    deep = model.blocks[-1]
    assert (deep(h, text=text)[0] - deep(h, text=other)[0]).abs().max().item() > 1e-3
    assert not hasattr(model.blocks[0], "proj_txt") and model.blocks[0].spec.text_width == 0
    assert [b.flip for b in model.blocks] == [True, False, True]  # L2R: blocks 0, 2 flipped (FACTS 3)


def _block_inputs(cfg, x, text):
    """The input of every block in the forward pass, as the oracle's (B, H, W, Ci) grids."""
    h = so.patchify(x, cfg["patch_size"])
    outs = [h]
    for i in range(cfg["num_blocks"]):
        h, _ = so.block_forward(_apple_sd(cfg), cfg, i, h, text if so._has_text(cfg, i) else None)
        outs.append(h)
    return outs


@pytest.mark.parametrize("name", ["t2i", "r2l-exp-all-text", "no-text-patch2"])
@pytest.mark.parametrize("guidance", [0.0, 3.6])
def test_every_block_exact_inverse_through_the_runtime_matches_the_oracle(name, guidance):
    """blocks[i]'s sequential decode by TorchBlockRunner (T + 1 runtime tokens, start token 0, text prefix in
    the cache) equals the oracle's reverse_block, guided on the text blocks."""
    cfg = VARIANTS[name]
    if guidance and not cfg["txt_dim"]:
        pytest.skip("guidance needs text")
    model, sd = _model(cfg), _apple_sd(cfg)
    x, text, null = _data(cfg)
    outs = _block_inputs(cfg, x, text)
    B, D = x.shape[0], model.config.token_dim
    cond = Conditioning.build_text(B, model.config.num_tokens + 1, text, null, guidance)
    runners = torch_runners(model)
    for i, (block, runner) in enumerate(zip(model.blocks, runners)):
        y = text if so._has_text(cfg, i) else None
        if y is not None and guidance:
            y = torch.cat([text, null])
        ref = so.reverse_block(sd, cfg, i, outs[i + 1], y, guidance if so._has_text(cfg, i) else 0.0)
        z = block.to_runner(block.permute(outs[i + 1].reshape(B, -1, D)))
        assert runner.num_tokens == model.config.num_tokens + 1 and torch.equal(
            z[:, 0], sd[f"blocks.{i}.sos_embed"][0].to(z.dtype).expand(B, -1))
        runner.begin(B, cond)
        got = block.permute(block.from_runner(sequential(runner, z).x)).reshape(ref.shape)
        assert (got - ref).abs().max().item() <= 1e-4, f"block {i}"
        if not guidance:  # and it is the forward's inverse
            assert (got - outs[i]).abs().max().item() <= 1e-4


def test_rope_angles_are_the_oracles_per_slot():
    cfg = TINY
    model = _model(cfg)
    deep, shallow = model.blocks[-1].spec, model.blocks[0].spec
    ref = so.rope_angles(cfg, 4, 4, n_text=5)  # (5 + 16, 32): text slots then grid slots
    got = deep.rope_angles()  # text slots, then runtime positions 0..16 (16: past the grid, never projected)
    assert got.shape == (5 + 17, 32)
    torch.testing.assert_close(got[:21], ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(shallow.rope_angles()[:16], so.rope_angles(cfg, 4, 4), atol=1e-12, rtol=0)


def test_starflow_guide_is_the_oracles_formula():
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(4, 3, 2, generator=g) + 0.2  # rows [c (2) ; u (2)]
    shift = torch.randn(4, 3, 2, generator=g)
    w = torch.full((2, 3), 2.5)
    xa, xb = guide(scale.log(), shift, w, 2, "starflow")
    s_ref, m_ref = so._guide(scale, shift, 2.5)
    torch.testing.assert_close(xa.exp(), s_ref[:2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(xb, m_ref[:2], atol=1e-6, rtol=1e-5)


def test_self_denoise_matches_the_oracle():
    cfg = TINY
    model = _model(cfg)
    x, text, _ = _data(cfg)
    got = model.self_denoise(x, text, noise_std=0.3)
    ref = so.self_denoise(_apple_sd(cfg), cfg, x, text, 0.3)
    assert (got - ref).abs().max().item() <= 1e-4 and (ref - x).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------------------------ loader
YAML = """arguments:
- no_flip: 1
- img_size: 32
- txt_size: 5
- channel_size: 4
- patch_size: 1
- channels: 64
- blocks: 3
- layers_per_block: 1 1 2
- noise_std: 0.3
- nvp: 1
- rope: 1
- adaln: 0
- sos: 1
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- vae: stabilityai/sd-vae-ft-ema
- text: google/flan-t5-xl
- cfg: 2.5
- soft_clip: 4
"""


@pytest.mark.parametrize("buffers", [True, False])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_loader_round_trips_apples_state_dict(tmp_path, buffers, fmt):
    sd = _apple_sd(TINY, seed=3, buffers=buffers)
    if fmt == "pth":
        path = tmp_path / "starflow.pth"
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file
        path = tmp_path / "starflow.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = load_starflow(path, dict(TINY))
    got = model.state_dict()
    assert set(got) == {k for k in sd if not any(b in k for b in BUFFER_KEYS)}
    assert all(torch.equal(got[k], sd[k]) for k in got)
    assert model.config.layers == (1, 1, 2) and not any(p.requires_grad for p in model.parameters())
    x, text, _ = _data(TINY)
    assert (model(x, text)[0] - so.forward(sd, TINY, x, text)[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("with_pyyaml", [True, False])
def test_loader_reads_apples_yaml(tmp_path, monkeypatch, with_pyyaml):
    if not with_pyyaml:
        monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError: the minimal parser
    (tmp_path / "cfg.yaml").write_text(YAML)
    kwargs, extras = config_from_yaml(tmp_path / "cfg.yaml")
    assert kwargs["img_size"] == 4 and kwargs["layers_per_block"] == [1, 1, 2] and kwargs["in_channels"] == 4
    assert extras["noise_std"] == 0.3 and "cfg" in extras["ignored"]
    torch.save(_apple_sd(TINY), tmp_path / "m.pth")
    model = load_starflow(tmp_path / "m.pth", tmp_path / "cfg.yaml", head_dim=32)  # txt_dim from the tensors
    assert model.config == StarFlowConfig.from_dict(TINY) and model.noise_std == 0.3


def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("change, error, words", [
    (lambda sd: sd.update({"learnable_self_denoiser.proj_in.weight": torch.zeros(4, 4)}), CheckpointError,
     ["self-denoiser"]),
    (lambda sd: sd.update({"blocks.2.attn_blocks.0.attention.query_norm.weight": torch.zeros(32)}), CheckpointError,
     ["qk-norm"]),
    (lambda sd: sd.update({"blocks.0.attn_blocks.0.mlp.gate_proj.weight": torch.zeros(4, 4)}), CheckpointError,
     ["SwiGLU"]),
    (lambda sd: sd.update({"blocks.0.pos_embed": torch.zeros(16, 64)}), CheckpointError, ["rope=0"]),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.endswith("sos_embed")], CheckpointError, ["sos=0"]),
    (lambda sd: sd.update({"blocks.1.proj_in.weight": torch.zeros(64, 5)}), CheckpointError,
     ["blocks.1.proj_in.weight", "(64, 5)", "(64, 4)"]),
    (lambda sd: sd.update({"blocks.1.final_norm.weight": torch.zeros(64, dtype=torch.long)}), CheckpointError,
     ["dtype"]),
])
def test_loader_refuses_bad_state_dicts_in_one_line(tmp_path, change, error, words):
    sd = _apple_sd(TINY)
    change(sd)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(error) as e:
        load_starflow(tmp_path / "m.pth", dict(TINY))
    _one_line(e, *words)


@pytest.mark.parametrize("override, words", [
    ({"temporal_causal": 1}, ["video"]), ({"use_pretrained_lm": "gemma3_4b"}, ["pretrained-LM"]),
    ({"use_swiglu": True}, ["SwiGLU"]), ({"use_qk_norm": 1}, ["qk-norm"]), ({"num_kv_heads": 1}, ["grouped"]),
    ({"norm_type": "rms_norm"}, ["RMSNorm"]), ({"use_post_norm": 1}, ["post-norm"]), ({"rope": 0}, ["rope=0"]),
    ({"sos": 0}, ["sos=0"]), ({"top_block_channels": 128}, ["width"]), ({"learnable_self_denoiser": 1}, ["denoiser"]),
    ({"channels": 128}, ["channels=128", "channels=64"]), ({"txt_size": 0}, ["txt_size"]),
    ({"layers_per_block": [1, 1]}, ["2 entries", "num_blocks = 3"]), ({"head_dim": 30}, ["head_dim"]),
    ({"img_size": 4096}, ["tokens", "at most"]), ({"seq_order": "T2B"}, ["seq_order"]),
])
def test_loader_refuses_out_of_scope_configs_in_one_line(tmp_path, override, words):
    torch.save(_apple_sd(TINY), tmp_path / "m.pth")
    with pytest.raises(ConfigError) as e:
        load_starflow(tmp_path / "m.pth", {**TINY, **override})
    _one_line(e, *words)


def test_tarflow_and_starflow_checkpoints_are_refused_by_the_other_loader(tmp_path):
    from sejd.model.checkpoint import load_checkpoint
    from sejd.model.tarflow import TarFlow, TarFlowConfig

    torch.save(TarFlow(TarFlowConfig(3, 8, 2, 32, 2, 1, head_dim=16)).state_dict(), tmp_path / "tarflow.pth")
    with pytest.raises(CheckpointError) as e:
        load_starflow(tmp_path / "tarflow.pth", dict(TINY))
    _one_line(e, "ml-tarflow", "load_checkpoint")
    torch.save(_apple_sd(TINY), tmp_path / "starflow.pth")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "starflow.pth")
    _one_line(e, "ml-starflow", "load_starflow")


def test_text_of_the_wrong_shape_is_an_input_error_naming_expected_and_got():
    model = _model(TINY)
    x, text, _ = _data(TINY)
    for bad in (text[:, :4], text[..., :11], text[:1]):
        with pytest.raises(InputError) as e:
            model(x, bad)
        _one_line(e, "(2, 5, 12)", str(tuple(bad.shape)))
    with pytest.raises(InputError):
        _model(VARIANTS["no-text-patch2"])(torch.zeros(1, 4, 8, 8), text[:1])


def test_the_3b_config_is_accepted_and_declares_apples_parameter_count():
    cfg = StarFlowConfig.from_dict(so.STARFLOW_3B)
    shapes = so.state_dict_shapes(so.STARFLOW_3B)
    params = {k: s for k, s in shapes.items() if not any(b in k for b in BUFFER_KEYS)}
    assert cfg.num_parameters == sum(torch.Size(s).numel() for s in params.values()) == 3_858_281_544
    assert cfg.layers == (2, 2, 2, 2, 2, 24) and [cfg.flips(i) for i in range(6)] == [True, False] * 3
    declared = {f"blocks.{i}.{k}": s for i in range(6) for k, s in cfg.block_spec(i).parameters().items()}
    assert declared == params
