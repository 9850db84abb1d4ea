"""The STARFlow oracle checked against itself, in ways that fail if its maths is wrong: inverses invert, the
Jacobi sampler lands on the sequential sampler's answer, the log-determinant is the Jacobian's, and the 3B
config's key set and parameter count are Apple's."""

import pytest
import torch

from tests.model import starflow_oracle as so

# 3 blocks (two flipped relative to each other), a text prefix on the deep block only, 2 heads of 32 (rope:
# 4 row + 4 column + 8 text frequencies), a non-square 3x4 grid so rows and columns cannot be confused.
TINY = {"in_channels": 4, "img_size": 4, "patch_size": 1, "channels": 64, "num_blocks": 3, "layers_per_block": [1, 1, 2],
        "head_dim": 32, "rope": True, "sos": True, "txt_size": 5, "txt_dim": 12, "cond_top_only": True,
        "use_softplus": True, "use_final_norm": True, "soft_clip": 4.0, "seq_order": "L2R"}


def _data(cfg, batch, H=3, W=4, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], H, W, generator=g, dtype=dtype)
    text = torch.randn(batch, cfg["txt_size"], cfg["txt_dim"], generator=g, dtype=dtype)
    return x, text


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("overrides", [{}, {"seq_order": "R2L", "use_softplus": False, "soft_clip": 0},
                                       {"cond_top_only": False, "use_final_norm": False}])
def test_per_block_reverse_inverts_forward(overrides):
    cfg = {**TINY, **overrides}
    sd = so.random_state_dict(cfg, seed=0)
    x, text = _data(cfg, 2)
    z, _ = so.forward(sd, cfg, x, text)
    assert _rel(z, x) > 0.05  # the flow really moves the data
    h = so.patchify(x, 1)
    outs = [h]
    for i in range(cfg["num_blocks"]):
        h, _ = so.block_forward(sd, cfg, i, h, text if so._has_text(cfg, i) else None)
        outs.append(h)
    torch.testing.assert_close(so.unpatchify(h, 1), z)
    for i in reversed(range(cfg["num_blocks"])):
        back = so.reverse_block(sd, cfg, i, outs[i + 1], text if so._has_text(cfg, i) else None)
        assert (back - outs[i]).abs().max().item() <= 1e-4, f"block {i}"
    assert (so.reverse_sample(sd, cfg, z, text) - x).abs().max().item() <= 1e-4


def test_logdet_is_the_jacobians():
    cfg = {**TINY, "img_size": 2}
    sd = so.random_state_dict(cfg, seed=2, dtype=torch.float64)
    x, text = _data(cfg, 2, H=2, W=3, dtype=torch.float64)  # 6 tokens x 4 channels = 24 dims
    _, logdet = so.forward(sd, cfg, x, text)
    for b in range(2):
        xb, tb = x[b:b + 1], text[b:b + 1]
        J = torch.autograd.functional.jacobian(lambda v, xb=xb, tb=tb: so.forward(sd, cfg, v.view_as(xb), tb)[0].flatten(),
                                               xb.flatten())
        sign, brute = torch.linalg.slogdet(J)
        assert sign.item() > 0
        torch.testing.assert_close(logdet[b], brute, atol=1e-8, rtol=1e-8)


def test_text_prefix_matters_only_on_the_deep_block():
    cfg = TINY
    sd = so.random_state_dict(cfg, seed=3)
    x, text = _data(cfg, 1)
    _, text2 = _data(cfg, 1, seed=7)
    h = so.patchify(x, 1)
    deep = cfg["num_blocks"] - 1
    assert _rel(so.block_forward(sd, cfg, deep, h, text)[0], so.block_forward(sd, cfg, deep, h, text2)[0]) > 1e-3
    assert "blocks.0.proj_txt.weight" not in sd and "blocks.2.proj_txt.weight" in sd


@pytest.mark.parametrize("guidance", [0.0, 3.6])
def test_jacobi_lands_on_the_sequential_sample(guidance):
    cfg = TINY
    sd = so.random_state_dict(cfg, seed=4)
    noise, text = _data(cfg, 2, seed=5)
    _, null = _data(cfg, 2, seed=6)
    y = torch.cat([text, null]) if guidance else text
    seq = so.reverse_sample(sd, cfg, noise, y, guidance)
    # a tight threshold: the fixed point itself (12 tokens, windows of 5 then 5 then 2)
    tight = so.jacobi_sample(sd, cfg, noise, y, guidance, block_size=5, threshold=1e-12, max_iters=32)
    assert _rel(tight, seq) <= 1e-3
    # Apple's settings (one 12-token window here) stop early but stay close
    loose = so.jacobi_sample(sd, cfg, noise, y, guidance, block_size=16, threshold=1e-3, max_iters=32)
    assert _rel(loose, seq) <= 5e-2
    # a causal window is exact after as many iterations as it has tokens, whatever the threshold
    capped = so.jacobi_sample(sd, cfg, noise, y, guidance, block_size=4, threshold=0.0, max_iters=4)
    assert _rel(capped, seq) <= 1e-5


def test_guidance_with_identical_texts_is_no_guidance_and_otherwise_changes_the_sample():
    cfg = TINY
    sd = so.random_state_dict(cfg, seed=8)
    noise, text = _data(cfg, 2, seed=9)
    _, null = _data(cfg, 2, seed=10)
    plain = so.reverse_sample(sd, cfg, noise, text, 0.0)
    torch.testing.assert_close(so.reverse_sample(sd, cfg, noise, torch.cat([text, text]), 3.6), plain)
    assert _rel(so.reverse_sample(sd, cfg, noise, torch.cat([text, null]), 3.6), plain) > 1e-3


def test_guide_formula_on_numbers():
    # sigma_c 1, sigma_u 2 -> ratio 0.5, s = 0.25; w = 2: den = 3 - 0.5 = 2.5
    scale, shift = so._guide(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]), 2.0)
    torch.testing.assert_close(scale, torch.full((2,), 1 / 2.5 ** 0.5))
    torch.testing.assert_close(shift, torch.full((2,), (3 * 1 - 0.5 * 3) / 2.5))
    # sigma_c > sigma_u clips the ratio at 1: plain extrapolation of the mean, sigma unchanged
    scale, shift = so._guide(torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0]), 2.0)
    torch.testing.assert_close(scale, torch.full((2,), 2.0))
    torch.testing.assert_close(shift, torch.full((2,), 3 * 1 - 2 * 3.0))


def test_rope_angles_layout():
    ang = so.rope_angles(TINY, 3, 4, n_text=5)  # (5 + 12, 32)
    assert ang.shape == (17, 32)
    assert torch.equal(ang[:, 0::2], ang[:, 1::2])  # one angle per adjacent pair
    img, txt = ang[5:, 0::2], ang[:5, 0::2]
    assert torch.all(txt[:, :8] == 0) and torch.all(img[:, 8:] == 0)  # text only on the last 8 pairs
    f = torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=img.dtype)  # 10000^(-2k/8)
    unit = 4 / 12 ** 0.5  # grid steps are scaled by pt_seq_len / sqrt(H*W) (1 on a square pt_seq_len grid)
    torch.testing.assert_close(img[4 + 3, :4], 1 * unit * f)  # slot 7 = row 1 ...
    torch.testing.assert_close(img[4 + 3, 4:8], 3 * unit * f)  # ... column 3
    torch.testing.assert_close(txt[2, 8:], 2 / 5 * 4 * 10000.0 ** (-torch.arange(8) / 8).double())


def test_3b_key_set_and_parameter_count():
    shapes = so.state_dict_shapes(so.STARFLOW_3B)
    assert shapes["blocks.5.attn_blocks.23.attention.qkv.weight"] == (9216, 3072)
    assert shapes["blocks.5.proj_txt.weight"] == (3072, 2048) and "blocks.4.proj_txt.weight" not in shapes
    assert shapes["blocks.0.proj_out.weight"] == (8, 3072) and shapes["blocks.0.sos_embed"] == (1, 1, 4)
    assert "blocks.5.attn_blocks.24.mlp.norm.weight" not in shapes and "blocks.0.attn_blocks.2.mlp.norm.bias" not in shapes
    buffers = {k for k in shapes if k == "var" or k.startswith("feat_rope.") or k.endswith("attn_mask")}
    params = sum(torch.Size(s).numel() for k, s in shapes.items() if k not in buffers)
    assert params == 3_858_281_544
    assert len(buffers) == 3 + 6
