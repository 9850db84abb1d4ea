import torch

from sejd.runtime.runner import Conditioning
from sejd.runtime.torch_runner import torch_runners
from tests.conftest import data_like, make_model


def full_pass(model, k, x_perm, labels):
    """The block's full causal pass (no cache) in its own order: affine params at every position."""
    block = model.blocks[k]
    return block.project(x_perm, 0, block.class_term(labels))


def test_kv_cached_step_equals_full_causal_pass_at_every_position():
    model = make_model()
    labels = torch.tensor([0, 4, -1])
    x = model.patchify(data_like(model, 3))
    for k, runner in enumerate(torch_runners(model)):
        xp = model.blocks[k].permute(x)
        xa_full, xb_full = full_pass(model, k, xp, labels)
        runner.begin(3, Conditioning.build(3, model.config.num_tokens, labels))
        for i in range(model.config.num_tokens):
            xa, xb = runner.step(xp[:, i], i)
            torch.testing.assert_close(xa, xa_full[:, i], atol=1e-5, rtol=0)
            torch.testing.assert_close(xb, xb_full[:, i], atol=1e-5, rtol=0)


def test_window_over_committed_prefix_equals_full_pass():
    model = make_model()
    x = model.patchify(data_like(model, 2))
    runner = torch_runners(model)[1]
    xp = model.blocks[1].permute(x)
    xa_full, xb_full = full_pass(model, 1, xp, None)
    runner.begin(2, Conditioning.build(2, model.config.num_tokens))
    runner.project(xp[:, :5], 0)  # commit positions 0..4
    runner.project(torch.randn(2, 6, 12), 5)  # scratch writes past the prefix are rolled back below
    xa, xb = runner.project(xp[:, 5:11], 5)  # roll back: recompute 5..10 over the committed prefix
    torch.testing.assert_close(xa, xa_full[:, 5:11], atol=1e-5, rtol=0)
    torch.testing.assert_close(xb, xb_full[:, 5:11], atol=1e-5, rtol=0)


def test_cfg_rows_combine_as_the_two_pass_definition():
    model = make_model()
    T = model.config.num_tokens
    labels = torch.tensor([1, 3])
    g, temp = 1.5, 0.7
    cond = Conditioning.build(2, T, labels, guidance=g, guide_what="ab", attn_temp=temp, annealed_guidance=True)
    assert cond.rows == 4 and cond.guidance.shape == (2, T)
    block = model.blocks[0]
    xp = model.patchify(data_like(model, 2))
    runner = torch_runners(model)[0]
    runner.begin(2, cond)
    xa, xb = runner.project(xp, 0)
    ca, cb = block.project(xp, 0, block.class_term(labels))  # conditional pass
    ua, ub = block.project(xp, 0, block.class_term(None), temp=temp)  # unconditional pass at attn_temp
    w = (torch.arange(T) + 1) / (T - 1) * g  # annealed weight at each position
    torch.testing.assert_close(xa, ca + w[:, None] * (ca - ua), atol=1e-5, rtol=0)
    torch.testing.assert_close(xb, cb + w[:, None] * (cb - ub), atol=1e-5, rtol=0)


def test_guide_what_selects_a_or_b():
    cond = Conditioning.build(1, 4, guidance=2.0, guide_what="b")
    assert cond.guidance[0].abs().sum() == 0 and bool((cond.guidance[1] == 2.0).all())
