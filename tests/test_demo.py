import json

from sejd import save_checkpoint
from sejd.workflows.demo import main
from tests.conftest import make_model


def test_demo_runs_the_whole_job_and_writes_its_outputs(tmp_path):
    model = make_model()
    model.noise_std = 0.05
    save_checkpoint(model, tmp_path / "ckpt")
    out = tmp_path / "demo"
    assert main(["--source", str(tmp_path / "ckpt"), "--out", str(out), "--batch", "1,2", "--runs", "1"]) == 0
    for f in ("samples.png", "bench.png", "bench.json", "check.json", "bundle/plan.json",
              "bundle/engines/ort-cpu/manifest.json"):
        assert (out / f).exists(), f
    check = json.loads((out / "check.json").read_text())
    assert check["passed"] and any(c["name"].startswith("plan auto") for c in check["checks"])
    bench = json.loads((out / "bench.json").read_text())
    assert {r["decoder"] for r in bench["runs"]} == {"forward", "reference", "sequential", "ujd", "sjd", "gs-jacobi", "auto"}
