"""`sejd analyze`: the attention window, redundancy on models whose dependence is known by construction,
the Jacobi profile's invariants, and the command's JSON."""

import json
import math

import pytest
import torch

from sejd.cli import main
from sejd.core.errors import InputError
from sejd.runtime.decoders import jacobi, sequential
from sejd.runtime.runner import Conditioning
from sejd.runtime.torch_runner import TorchBlockRunner, torch_runners
from sejd.workflows.analysis.profile import jacobi_profile
from sejd.workflows.analysis.redundancy import Likelihood, smallest_window
from sejd.workflows.analysis.trace import exact_trace
from sejd.workflows.analysis.window import window_grid, windowed
from sejd.workflows.analyze import analyze, likelihood_images
from sejd.workflows.source import Session
from tests.conftest import data_like, make_model


def brute_force_project(block, x, window):
    """The windowed block's affine parameters at every position, one query at a time, each attending
    over an explicit list of allowed keys (positions l-window+1 .. l)."""
    T = x.shape[1]
    h = block.proj_in(x) + block.permute(block.pos_embed, dim=0)[:T]
    for layer in block.attn_blocks:
        att = layer.attention
        q, k, v = att.qkv(att.norm(h)).chunk(3, dim=-1)  # (B, T, C) each, heads side by side
        heads, scale = block.spec.heads, block.spec.head_dim**-0.5
        out = torch.zeros_like(h)
        for pos in range(T):
            keys = [j for j in range(T) if pos - window < j <= pos]
            for head in range(heads):
                cols = slice(head * h.shape[-1] // heads, (head + 1) * h.shape[-1] // heads)
                scores = torch.stack([(q[:, pos, cols] * k[:, j, cols]).sum(-1) for j in keys], -1) * scale
                weights = scores.softmax(-1)
                out[:, pos, cols] = sum(weights[:, i, None] * v[:, j, cols] for i, j in enumerate(keys))
        h = h + att.proj(out)
        h = h + layer.mlp.main(layer.mlp.norm(h))
    return block.split(block.proj_out(h))


@pytest.mark.parametrize("window", [1, 3, 16])
def test_window_mask_matches_brute_force_in_full_pass_steps_and_windows(window):
    model = make_model(num_classes=0)
    block = model.blocks[1]  # a flipped block: the window is in the block's own order
    T = model.config.num_tokens
    x = block.permute(model.patchify(data_like(model, 2)))
    xa_ref, xb_ref = brute_force_project(block, x, window)
    runner = TorchBlockRunner(block, T, model.config.token_dim)
    with torch.no_grad(), windowed(block, window, T):
        xa, xb = block.project(x, 0)  # one full pass
        torch.testing.assert_close(xa, xa_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(xb, xb_ref, atol=1e-5, rtol=0)
        runner.begin(2, Conditioning.build(2, T))
        steps = [runner.step(x[:, i], i) for i in range(T)]  # KV-cached single tokens
        torch.testing.assert_close(torch.stack([s[1] for s in steps], 1), xb_ref, atol=1e-5, rtol=0)
        runner.project(x[:, :5], 0)  # commit 0..4, then a window over the static cache
        xa_w, _ = runner.project(x[:, 5:12], 5)
        torch.testing.assert_close(xa_w, xa_ref[:, 5:12], atol=1e-5, rtol=0)
    assert block.window is None  # restored on leaving


def test_windowed_model_differs_from_exact_and_window_T_is_exact():
    model = make_model(num_classes=0)
    block = model.blocks[0]
    T = model.config.num_tokens
    x = model.patchify(data_like(model, 2))
    exact = block.project(x, 0)[1]
    with windowed(block, 2, T):
        assert not torch.allclose(block.project(x, 0)[1], exact, atol=1e-4)
    block.window = T  # set directly: `windowed` turns w >= T into no window, which would test nothing
    try:
        torch.testing.assert_close(block.project(x, 0)[1], exact, atol=1e-6, rtol=0)
    finally:
        block.window = None


def test_window_must_be_a_positive_int():
    model = make_model()
    with pytest.raises(InputError, match="window must be an int >= 1"):
        with windowed(model.blocks[0], 0, model.config.num_tokens):
            pass


def test_decoders_run_windowed_blocks_through_the_runner():
    """Jacobi to convergence on a windowed block reaches that block's own sequential solution."""
    model = make_model(num_classes=0)
    T, D = model.config.num_tokens, model.config.token_dim
    runner = TorchBlockRunner(model.blocks[2], T, D)
    z = torch.randn(2, T, D, generator=torch.Generator().manual_seed(4))
    with windowed(model.blocks[2], 2, T):
        runner.begin(2, Conditioning.build(2, T))
        seq = sequential(runner, z).x
        jac = jacobi(runner, z, torch.zeros_like(z), tau=0.0).x
    runner.begin(2, Conditioning.build(2, T))
    exact = sequential(runner, z).x
    torch.testing.assert_close(jac, seq, atol=1e-5, rtol=0)
    assert (seq - exact).abs().max() > 1e-3


def test_window_grid():
    assert window_grid(64) == [1, 2, 4, 8, 16, 32, 64]
    assert window_grid(64, quick=True) == [1, 4, 16, 64]
    assert window_grid(48, quick=True) == [1, 4, 16, 48]


def test_smallest_window_needs_every_larger_window_to_pass():
    assert smallest_window([1, 2, 4, 8], [True, False, True, True]) == 4
    assert smallest_window([1, 2, 4, 8], [True, True, True, True]) == 1
    assert smallest_window([1, 2, 4, 8], [False, False, False, True]) == 8


def previous_token_model():
    """Token l+1 depends on token l alone: every attention value is its bias (the value weights are
    zero), so attention adds the same vector whatever it attends to, and position l's output comes from
    token l through the residual path and the MLP."""
    model = make_model(seed=5, num_classes=0)
    C, D = model.config.channels, model.config.token_dim
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight[:D] = 0  # additive (xa = bias only): nothing can overflow
            block.proj_out.weight[D:].mul_(10)  # a strong dependence on the current token
            for layer in block.attn_blocks:
                layer.attention.qkv.weight[2 * C:] = 0
                layer.attention.qkv.bias[2 * C:].normal_(0, 1)
    return model


def full_dependence_model():
    """Token l+1 depends on every token before it alike: queries and keys are zero, so attention is the
    uniform mean of the values of all allowed positions; cutting any of them off changes the output."""
    model = make_model(seed=6, num_classes=0)
    C, D = model.config.channels, model.config.token_dim
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight[:D] = 0  # additive (xa = bias only): nothing can overflow
            block.proj_out.weight[D:].mul_(10)
            for layer in block.attn_blocks:
                layer.attention.qkv.weight[:2 * C] = 0
                layer.attention.qkv.bias[:2 * C] = 0
                layer.attention.proj.weight.mul_(5)
    return model


def test_previous_token_model_reports_window_1():
    model = previous_token_model()
    result = analyze(Session(model, None, "torch"), batch=2, quick=True, progress=False)
    for b in result["blocks"]:
        r = b["redundancy"]
        assert r["window"] == 1, r
        assert abs(r["nll_increase"][0]) < 1e-5 and r["psnr_db"][0] > 100, r
        assert b["predicted"]["by_window"] == "jacobi"
    assert result["summary"]["window"] == [1] * 4 and result["summary"]["predicted_by_window"] == ["jacobi"] * 4


def test_full_dependence_model_reports_the_whole_sequence():
    model = full_dependence_model()
    T = model.config.num_tokens
    result = analyze(Session(model, None, "torch"), batch=2, quick=False, progress=False)
    for b in result["blocks"]:
        r = b["redundancy"]
        assert r["window"] == r["window_nll"] == T, r
        assert r["windows"][-2] == T // 2 and r["nll_increase"][-2] > 0.01, r
        assert b["predicted"]["by_window"] == "sequential"
    first = result["blocks"][0]["redundancy"]  # the first sampling block decodes from the prior noise
    assert first["window_psnr"] == T and first["psnr_db"][-2] < 40, first


def test_likelihood_is_the_models_nll_and_window_T_adds_nothing():
    model = make_model()
    x = data_like(model, 5)
    y = torch.tensor([0, 1, 2, 3, -1])
    lik = Likelihood(model, x, y)
    bits = float(model.bits_per_dim(x, y).mean())
    assert lik.exact == pytest.approx(bits * math.log(2) - math.log(128), abs=1e-5)
    assert lik.windowed(2, model.config.num_tokens) == pytest.approx(lik.exact, abs=1e-6)
    assert lik.windowed(2, 1) != pytest.approx(lik.exact, abs=1e-4)


def test_profile_invariants():
    model = make_model(num_classes=0)
    T = model.config.num_tokens
    noise = torch.randn(3, T, model.config.token_dim, generator=torch.Generator().manual_seed(2))
    runners = torch_runners(model)
    trace = exact_trace(model, runners, noise)
    taus = (0.5, 0.1, 0.01)
    for tb in trace.blocks:
        p = jacobi_profile(runners[tb.block], tb, trace.cond, taus, target_db=40.0)
        n = len(p["residual"])
        assert 1 <= n <= T - 1 and len(p["psnr_db"]) == n
        for t in range(1, n + 1):  # after t iterations tokens 0..t are exact and do not move
            assert p["exact_prefix"][t - 1] >= t + 1
            for fronts in p["front"]["first_moving_token"]:
                assert fronts[t - 1] >= t
        assert p["residual"][-1] < min(taus) and p["psnr_db"][-1] >= 40
        its = p["iterations_to_tau"]
        assert all(a <= b for a, b in zip(its, its[1:]))  # a smaller tau never stops earlier
        assert p["tau_for_target"] in taus
        assert p["psnr_db_at_tau"][taus.index(p["tau_for_target"])] >= 40
    # iterating to T-1 is exact decoding
    tb = trace.blocks[0]
    p = jacobi_profile(runners[tb.block], tb, trace.cond, (1e-12,), target_db=math.inf)
    assert len(p["residual"]) == T - 1 and p["exact_prefix"][-1] == T and p["psnr_db"][-1] > 100


def test_builtin_models_measure_nll_on_their_held_out_data():
    from sejd import load_checkpoint

    model = load_checkpoint("builtin:digits")
    images, labels, note = likelihood_images(model, 4, seed=0, progress=False)
    assert images.shape == (4, 1, 16, 16) and labels.tolist() == [int(v) for v in labels]
    assert note.startswith("held-out digits")
    other = make_model(num_classes=0)  # not trained by sejd: its own exact samples
    images, labels, note = likelihood_images(other, 3, seed=0, progress=False)
    assert images.shape == (3, 3, 8, 8) and labels is None and "exact samples" in note


def test_quick_run_writes_json_with_documented_keys_plots_and_compares_with_a_plan(tmp_path, capsys):
    from sejd import save_checkpoint
    from sejd.runtime.plan import named_plan

    save_checkpoint(make_model(num_classes=0), tmp_path / "ckpt")
    plan = named_plan("sjd", 4)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan.to_dict()))
    assert main(["analyze", str(tmp_path / "ckpt"), "--quick", "--batch", "2", "--plan", str(plan_file),
                 "--json", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png")]) == 0
    assert "agreement with the tuned plan" in capsys.readouterr().out
    result = json.loads((tmp_path / "a.json").read_text())
    for key in ("schema", "source", "backend", "batch", "quick", "num_tokens", "tolerances", "windows", "taus",
                "nll_data", "nll_exact_nats_per_dim", "rule", "definitions", "tuned_plan", "blocks", "summary"):
        assert key in result, key
    assert result["windows"] == [1, 4, 16] and result["quick"] is True
    assert [b["block"] for b in result["blocks"]] == [3, 2, 1, 0]
    for b in result["blocks"]:
        assert set(b["redundancy"]) >= {"windows", "nll_increase", "psnr_db", "window_nll", "window_psnr", "window"}
        assert set(b["jacobi"]) >= {"residual", "psnr_db", "front", "iterations_to_tau", "tau_for_target"}
        assert b["tuned"]["decoder"] == ("sequential" if b["block"] == 3 else "jacobi")
        assert b["tuned"]["agree"] == (b["tuned"]["decoder"] == b["predicted"]["decoder"])
        assert b["redundancy"]["psnr_db"][-1] is None  # w = T is the exact model: infinite PSNR
    assert result["summary"]["tuned"] == ["sequential", "jacobi", "jacobi", "jacobi"]
    for name in ("a.png", "a_redundancy.png", "a_profile.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_analyze_refuses_a_bad_batch(capsys):
    assert main(["analyze", "builtin:digits", "--batch", "0"]) == 2
    assert "--batch must be >= 1, got 0" in capsys.readouterr().err


def test_with_plan_compares_an_existing_analysis_with_a_later_plan():
    from sejd.runtime.plan import named_plan
    from sejd.workflows.analyze import with_plan

    result = analyze(Session(previous_token_model(), None, "torch"), batch=1, quick=True, progress=False)
    assert result["summary"]["tuned"] is None and result["summary"]["agreement"] is None
    with_plan(result, named_plan("sequential", 4), "all sequential")
    assert result["tuned_plan"] == "all sequential"
    assert result["summary"]["tuned"] == ["sequential"] * 4
    predicted = result["summary"]["predicted"]
    assert result["summary"]["agreement"] == f"{predicted.count('sequential')}/4"


def test_rule_weighs_jacobi_iterations_by_the_cost_of_a_pass():
    from sejd.workflows.analyze import apply_rule

    result = analyze(Session(make_model(num_classes=0), None, "torch"), batch=1, quick=True, progress=False)
    cost = result["cost"]
    assert cost["pass_seconds"] > 0 and cost["step_seconds"] > 0 and cost["pass_in_steps"] > 0
    T = result["num_tokens"]
    iterations = [b["predicted"]["iterations"] for b in result["blocks"]]
    apply_rule(result, {"source": "given", "pass_in_steps": 1.0})  # a pass as cheap as a step: Jacobi pays
    assert result["summary"]["predicted"] == ["jacobi" if i < T - 1 else "sequential" for i in iterations]
    apply_rule(result, {"source": "given", "pass_in_steps": float(T)})  # a pass dearer than all the steps
    assert result["summary"]["predicted"] == ["sequential"] * 4
    assert [b["predicted"]["jacobi_cost_in_steps"] for b in result["blocks"]] == [i * T for i in iterations]
