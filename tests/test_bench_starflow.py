"""`sejd bench` on a STARFlow: Apple's sampler (`starflow`) is the baseline row, ml-tarflow's rows (forward
density graph, `reference` loop) are not run, quality is latent PSNR against exact decoding."""

import json
import statistics

from sejd.cli import main
from sejd.model.starflow import StarFlowConfig
from sejd.model.starflow_checkpoint import build_starflow
from sejd.workflows.bench import bench
from sejd.workflows.source import Session
from tests.model import starflow_oracle as so
from tests.model.test_starflow import TINY


def test_bench_compares_every_plan_with_apples_sampler():
    model = build_starflow(so.random_state_dict(TINY, seed=0), StarFlowConfig.from_dict(TINY))
    result = bench(Session(model, None, "torch"), batches=(2,), runs=2, warmup=0, guidance=2.0, log=lambda *a: None)
    rows = {r["decoder"]: r for r in result["runs"]}
    assert set(rows) == {"starflow", "sequential", "ujd", "sjd", "gs-jacobi"}  # no forward, no reference
    apple = statistics.median(rows["starflow"]["seconds_all"])
    for r in rows.values():
        assert abs(r["speedup_vs_reference"] - apple / r["seconds_median"]) < 1e-9
    assert rows["sequential"]["psnr_db_vs_sequential"] == float("inf")
    assert rows["starflow"]["psnr_db_vs_sequential"] >= 40  # Apple's sampler is close to exact decoding


def test_bench_cli_on_a_starflow_checkpoint(tmp_path, capsys):
    import torch

    torch.save(so.random_state_dict(TINY, seed=0), tmp_path / "starflow.pth")
    assert main(["bench", str(tmp_path / "starflow.pth"), "--config", json.dumps(TINY), "--batch", "1", "--runs", "1",
                 "--decoders", "starflow,sequential,sjd", "--json", str(tmp_path / "b.json")]) == 0
    runs = json.loads((tmp_path / "b.json").read_text())["runs"]
    assert [r["decoder"] for r in runs] == ["starflow", "sequential", "sjd"]
