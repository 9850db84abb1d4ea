import dataclasses
import json
import shutil
import statistics
import time

import pytest
import torch

from sejd import PlanError, sample
from sejd.cli import main
from sejd.runtime.plan import BlockPlan, Plan
from sejd.workflows.quality import psnr_db
from sejd.workflows.source import open_source
from sejd.workflows.tune import Tuner, tune


@pytest.fixture(scope="module")
def tuned(tiny_bundle):
    src = open_source(tiny_bundle.path, "ort-cpu")
    plan = tune(src, batch=2, target_db=45.0, taus=(0.5, 0.1, 0.01), out=tiny_bundle.path / "plan.json",
                log=lambda *a: None)
    yield src, plan
    (tiny_bundle.path / "plan.json").unlink()
    shutil.rmtree(tiny_bundle.path / "plans")


def test_tuned_plan_meets_the_target_on_fresh_noise(tuned):
    src, plan = tuned
    cfg = src.model.config
    noise = torch.randn(4, cfg.num_tokens, cfg.token_dim, generator=torch.Generator().manual_seed(777))
    labels = torch.tensor([0, 1, 2, 3])
    exact = sample(src.model, noise, labels=labels, plan="sequential", progress=False).images
    got = sample(src.model, noise, labels=labels, plan=src.plan("auto"), runners=src.runners, progress=False)
    assert psnr_db(got.images, exact) >= 45.0
    assert plan.meta["holdout"]["psnr_db"] >= 45.0 and plan.meta["holdout"]["images"] >= 16


def test_plan_json_records_its_measurements_and_bundle(tuned, tiny_bundle):
    _, plan = tuned
    data = json.loads((tiny_bundle.path / "plan.json").read_text())
    assert data["meta"]["bundle_manifest_sha256"] == tiny_bundle.manifest_sha256
    assert len(data["blocks"]) == 4 and len(data["meta"]["trials"]) >= 4
    assert all({"seconds", "psnr_db", "iterations"} <= set(t) for t in data["meta"]["trials"])


def test_plan_json_records_the_head_to_head_and_the_single_token_path(tuned, tiny_bundle):
    src, plan = tuned
    h2h = plan.meta["head_to_head"]
    names = h2h["order"][0]
    assert h2h["rounds"] >= 5 and names[0] == "tuned" and "sequential[host]" in names
    for r, order in enumerate(h2h["order"]):  # every round runs every candidate once, the order rotating
        assert order == names[r % len(names):] + names[:r % len(names)]
    medians = {n: statistics.median(v) for n, v in h2h["seconds"].items()}
    assert h2h["winner"] == min(medians, key=medians.get)
    assert all(len(v) == h2h["rounds"] for v in h2h["seconds"].values())
    for name in h2h["left_out"]:  # a named plan is left out only for missing the target
        assert h2h["psnr_db"][name] < 45.0
    assert plan.meta["single_token_path"] == src.runners[0].single_token_path


def _slowed(monkeypatch, runner, method, seconds):
    original = getattr(runner, method)

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, method, slow)


def test_the_exact_baseline_takes_each_blocks_fastest_exact_path(tiny_bundle, monkeypatch):
    src = open_source(tiny_bundle.path, "ort-cpu")
    _slowed(monkeypatch, src.runners[0], "sequential_loop", 0.05)  # block 0: the one-call path made slow
    _slowed(monkeypatch, src.runners[1], "step", 0.005)  # block 1: 15 host-driven steps made slow
    tuner = Tuner(src, 1, 40.0, taus=(0.5,), calib_seeds=(0,), holdout_seeds=(1000,), repeats=1, log=lambda *_: None)
    baseline = tuner.exact_baseline()
    assert [b.decoder for b in baseline.plan.blocks] == ["sequential"] * 4
    assert tuner.exact[0].variant == "host" and tuner.exact[1].variant == "loop"
    assert baseline.plan.blocks[0].variant == "host" and baseline.plan.blocks[1].variant == "loop"
    assert tuner.uniform(0.5, "sequential").blocks[3] == tuner.exact[3]  # exact blocks of every candidate


def test_variants_that_a_runner_would_run_from_the_host_are_not_timed(tiny_bundle, monkeypatch):
    """`chunk` and `loop` fall back to host-driven Jacobi where a block's runner lacks jacobi_k / jacobi_loop
    (the default export): the same result, so timing them would only cost tuning time."""
    src = open_source(tiny_bundle.path, "ort-cpu")
    assert all({"jacobi_chunk", "jacobi_loop"} <= r.one_call for r in src.runners)  # every variant exported here
    for r in src.runners[2:]:  # blocks 2 and 3 as a default bundle has them
        monkeypatch.setattr(r, "exported", r.exported - {"jacobi_k", "jacobi_loop"})
    assert not {"jacobi_chunk", "jacobi_loop"} & src.runners[2].one_call
    lines, timed = [], []
    tuner = Tuner(src, 1, 40.0, taus=(0.5,), calib_seeds=(0,), holdout_seeds=(1000,), repeats=1, log=lines.append)
    run = tuner.run
    monkeypatch.setattr(tuner, "run", lambda plan, **kw: (timed.append([b.variant for b in plan.blocks]),
                                                          run(plan, **kw))[1])
    jacobi_plan = Plan("auto", [BlockPlan("jacobi", tau=0.5) for _ in range(3)] + [BlockPlan("sequential")])
    tuner.variants(run(jacobi_plan))
    assert ["chunk", "chunk", "host", "host"] in timed and ["loop", "loop", "host", "host"] in timed
    assert all(v[2] == "host" for v in timed)  # block 2 never tries what it lacks

    for r in src.runners[:2]:  # now no block has them: those rounds are skipped, and the log says why
        monkeypatch.setattr(r, "exported", r.exported - {"jacobi_k", "jacobi_loop"})
    timed.clear()
    tuner.variants(run(jacobi_plan))
    assert not any({"chunk", "loop"} & set(v) for v in timed)
    assert sum("not timed" in line for line in lines) == 2
    assert len(timed) == 3 + 1  # host, host+freeze, host+per-sample, then the fastest per block


def test_auto_is_never_slower_than_the_fastest_named_plan_reaching_the_target(tiny_bundle, monkeypatch, tmp_path):
    """The search's stages compare runs taken at different moments; here they are made to end on a plan
    that is 10x slower than exact decoding (every block Jacobi, each pass slowed): the head-to-head
    must replace it by the fastest named plan that reaches the target."""
    src = open_source(tiny_bundle.path, "ort-cpu")
    for r in src.runners:
        _slowed(monkeypatch, r, "jacobi_iter", 0.01)
    slow = Plan("auto", [BlockPlan("jacobi", tau=0.001) for _ in range(4)])
    monkeypatch.setattr(Tuner, "search_uniform", lambda self, best: best)
    monkeypatch.setattr(Tuner, "variants", lambda self, best: self.run(slow))
    plan = tune(src, batch=1, target_db=40.0, taus=(0.5, 0.001), out=tmp_path / "plan.json", log=lambda *a: None)
    h2h = plan.meta["head_to_head"]
    assert h2h["winner"] != "tuned" and plan.meta["chosen"].startswith("named plan")
    assert all(b.decoder == "sequential" for b in plan.blocks) or h2h["winner"] in ("sjd", "gs-jacobi", "ujd")
    medians = h2h["median_seconds"]
    assert medians[h2h["winner"]] == min(medians.values()) and medians["tuned"] > medians[h2h["winner"]]
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["blocks"] == [dataclasses.asdict(b) for b in plan.blocks]


def test_plan_for_another_bundle_is_refused(tuned, tiny_bundle, tmp_path):
    data = json.loads((tiny_bundle.path / "plan.json").read_text())
    data["meta"]["bundle_manifest_sha256"] = "f" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    src, _ = tuned
    with pytest.raises(PlanError, match="tuned for another bundle"):
        src.plan(str(other))


def test_cli_sample_on_bundle_with_auto_plan(tuned, tiny_bundle, tmp_path, capsys):
    out, npy = tmp_path / "g.png", tmp_path / "s.npy"
    assert main(["sample", str(tiny_bundle.path), "-n", "3", "--plan", "auto", "--out", str(out),
                 "--npy", str(npy)]) == 0
    import numpy as np
    assert np.load(npy).shape == (3, 3, 8, 8) and out.exists()
    assert "backend ort-cpu" in capsys.readouterr().out


def test_cli_rejects_bad_tau_and_unknown_plan_entries(tiny_bundle, tmp_path, capsys):
    assert main(["tune", str(tiny_bundle.path), "--tau", "0.5,0"]) == 2
    assert "--tau values must be > 0" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"blocks": [{"decoder": "jacobi", "variant": "warp"}] * 4}))
    assert main(["sample", str(tiny_bundle.path), "-n", "1", "--plan", str(bad)]) == 2
    assert "unknown variant 'warp'" in capsys.readouterr().err
    bad.write_text(json.dumps({"blocks": [{"decoder": "jacobi"}] * 5}))
    assert main(["sample", str(tiny_bundle.path), "-n", "1", "--plan", str(bad)]) == 2
    assert "has 5 blocks, the model has 4" in capsys.readouterr().err


def test_bench_json_has_every_field(tiny_bundle, tmp_path):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench", str(tiny_bundle.path), "--batch", "1,2", "--runs", "2", "--warmup", "0",
                 "--decoders", "forward,reference,sequential,sjd", "--json", str(js), "--plot", str(png)]) == 0
    data = json.loads(js.read_text())
    forward = {r["batch"]: r for r in data["runs"] if r["decoder"] == "forward"}
    assert sorted(forward) == [1, 2] and all(r["multiple_of_forward"] == 1.0 for r in forward.values())
    data["runs"] = [r for r in data["runs"] if r["decoder"] != "forward"]
    for r in data["runs"]:  # every decoder as a multiple of the density evaluation of its batch
        assert r["multiple_of_forward"] == pytest.approx(r["seconds_median"] / forward[r["batch"]]["seconds_median"])
    fields = {"decoder", "backend", "batch", "seconds_median", "seconds_all", "seconds_min", "spread", "noisy",
              "single_token_path", "speedup_vs_reference",
              "speedup_vs_sequential", "psnr_db_vs_sequential", "max_abs_vs_sequential", "iterations_per_block",
              "seconds_per_block", "timing_only", "peak_rss_bytes"}
    assert {r["decoder"] for r in data["runs"]} == {"reference", "sequential", "sjd"}
    for r in data["runs"]:
        assert fields <= set(r) and len(r["seconds_all"]) == 2
        assert r["seconds_median"] == pytest.approx(statistics.median(r["seconds_all"]))
    seq = [r for r in data["runs"] if r["decoder"] == "sequential"]
    assert all(r["psnr_db_vs_sequential"] > 100 and r["speedup_vs_sequential"] == 1.0 for r in seq)
    assert png.stat().st_size > 1000 and "torch" in data["machine"] and "onnxruntime" in data["machine"]
    assert data["peak_rss_bytes"] > 10 * 2**20 and not any(r["timing_only"] for r in data["runs"])
    assert data["single_token_steps"] == open_source(tiny_bundle.path, "ort-cpu").single_token_path != "PyTorch"
    assert all(r["single_token_path"] == data["single_token_steps"] for r in data["runs"]
               if r["decoder"] not in ("forward", "reference"))


def test_the_bench_forward_row_evaluates_the_density_on_the_backend(tiny_bundle):
    from sejd.workflows.bench import forward_call

    src = open_source(tiny_bundle.path, "ort-cpu")
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.tensor([1, -1])
    call, what = forward_call(src, images, labels)
    assert what == "forward graph (ort-cpu)"
    z, logdet = call()  # the bundle's forward graph
    with torch.no_grad():
        want_z, _, want_logdet = src.model(images, labels)
    torch.testing.assert_close(torch.from_numpy(z), want_z, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(logdet), want_logdet, atol=1e-4, rtol=0)


def test_bench_forward_alone_decodes_nothing_and_guided_rows_double(tiny_bundle):
    from sejd.workflows.bench import bench

    src = open_source(tiny_bundle.path, "ort-cpu")
    result = bench(src, batches=(2,), decoders=["forward"], runs=1, warmup=0, guidance=1.0, log=lambda *_: None)
    (row,) = result["runs"]  # no exact decode behind it
    assert row["decoder"] == "forward" and row["rows"] == 4 and row["runs_on"] == "forward graph (ort-cpu)"
