"""`sejd bench` (interleaved rounds, spread, load warnings) and `sejd.core.machine` (usable cores, cgroup quota)."""

import json
import statistics

import numpy as np
import pytest

from sejd.cli import main
from sejd.core import machine
from sejd.runtime.torch_runner import torch_runners
from sejd.workflows import bench as bench_module
from sejd.workflows.bench import REFERENCE_PATH, Candidate, bench, rounds, table, timing
from sejd.workflows.source import Session
from tests.conftest import make_model


def _tree(tmp_path, files: dict):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, cores", [
    ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2 with a quota
    ({"cpu.max": "max 100000\n"}, None),  # cgroup v2, no limit
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # cgroup v1, no limit
    ({"cpu/cpu.cfs_quota_us": "300000\n"}, None),  # v1 without its period
    ({"cpu.max": "garbage"}, None),
    ({}, None),  # no cgroup files at all
])
def test_cgroup_quota_parsing(tmp_path, files, cores):
    assert machine.cgroup_quota_cores(_tree(tmp_path, files)) == cores


def test_usable_cores_is_the_quota_rounded_up_under_the_affinity(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "affinity_count", lambda: 8)
    assert machine.usable_cores(_tree(tmp_path, {"cpu.max": "150000 100000"})) == 2
    assert machine.usable_cores(_tree(tmp_path, {"cpu.max": "max 100000"})) == 8
    assert machine.usable_cores(_tree(tmp_path, {"cpu.max": "1600000 100000"})) == 8  # quota above the mask
    assert machine.usable_cores(_tree(tmp_path, {"cpu.max": "1000 100000"})) == 1  # 0.01 cores: at least 1


def test_machine_info(tmp_path):
    info = machine.machine_info({"native_step_threads": 3}, root=_tree(tmp_path, {"cpu.max": "200000 100000"}))
    assert info["cgroup_quota_cores"] == 2.0 and 1 <= info["usable_cores"] <= 2
    assert info["native_step_threads"] == 3 and info["torch_threads"] >= 1 and "torch" in info
    assert info["load_average"] is None or len(info["load_average"]) == 3


# --- sejd bench ---------------------------------------------------------------------------------------


def quiet(*_):
    pass


def test_rounds_rotate_the_order_and_record_only_timed_rounds():
    calls = []
    cands = [Candidate(x, x, lambda x=x: calls.append(x) or x) for x in "ABC"]
    rounds(cands, runs=4, warmup=1)
    assert "".join(calls) == "CAB" + "ABC" + "BCA" + "CAB" + "ABC"  # the warm-up round, then timed round i from i
    assert all(len(c.times) == 4 and c.result == c.decoder for c in cands)


def test_bench_interleaves_the_decoders_of_a_batch(monkeypatch):
    calls, real = [], bench_module.sample

    def recording(model, noise, plan, **kw):
        calls.append(str(plan) if isinstance(plan, str) else plan.name)
        return real(model, noise, plan=plan, **kw)

    monkeypatch.setattr(bench_module, "sample", recording)
    bench(Session(make_model(), None, "torch"), batches=(1,), decoders=["reference", "sequential", "ujd"], runs=3,
          warmup=0, log=quiet)
    # sequential is measured, so exact decoding is not run again
    assert calls == ["reference", "sequential", "ujd", "sequential", "ujd", "reference",
                     "ujd", "reference", "sequential"]


@pytest.mark.parametrize("times, noisy", [([1.0, 1.0, 1.0, 1.0, 10.0], False), ([1.0, 2.0, 3.0, 4.0, 5.0], True),
                                          ([1.0, 1.05, 1.1, 1.0, 1.02], False), ([2.0], False)])
def test_timing_fields(times, noisy):
    t = timing(times)
    q1, q3 = np.percentile(times, [25, 75])  # linear interpolation: statistics' "inclusive" quartiles
    assert t["seconds_iqr"] == pytest.approx(q3 - q1) and t["seconds_median"] == statistics.median(times)
    assert t["spread"] == pytest.approx((q3 - q1) / statistics.median(times))
    assert t["seconds_min"] == min(times) and t["seconds_all"] == times and t["noisy"] is noisy


def test_bench_rows_carry_their_spread_and_single_token_path(monkeypatch):
    monkeypatch.setattr(bench_module.machine, "load_average", lambda: (0.0, 0.0, 0.0))
    model = make_model()
    runners = torch_runners(model)
    for r in runners:
        r.single_token_path = "fake step"
    result = bench(Session(model, runners, "torch"), batches=(1,),
                   decoders=["forward", "reference", "sequential", "sjd"], runs=5, warmup=1, log=quiet)
    assert [r["decoder"] for r in result["runs"]] == ["forward", "reference", "sequential", "sjd"]
    assert result["runs"][2]["variant"] in ("sequential[host]", "sequential[loop]")  # both ran, the faster shown
    for r in result["runs"]:
        assert len(r["seconds_all"]) == 5 and r["seconds_min"] <= r["seconds_median"] <= max(r["seconds_all"])
        q1, q3 = np.percentile(r["seconds_all"], [25, 75])
        spread = (q3 - q1) / statistics.median(r["seconds_all"])
        assert r["spread"] == pytest.approx(spread) and r["noisy"] is bool(spread > 0.1)
    decoders = [r for r in result["runs"] if r["decoder"] != "forward"]
    assert {r["decoder"]: r["single_token_path"] for r in decoders} == {
        "reference": REFERENCE_PATH, "sequential": "fake step", "sjd": "fake step"}
    assert result["single_token_steps"] == "fake step" and result["loaded"] is False
    assert not any("load average" in w for w in result["warnings"])
    m = result["machine"]
    assert m["usable_cores"] >= 1 and m["load_average_before"] == (0.0, 0.0, 0.0) and "native_step_threads" not in m


def test_bench_warns_when_loaded_or_noisy(monkeypatch):
    monkeypatch.setattr(bench_module.machine, "load_average", lambda: (9.5, 1.0, 1.0))
    monkeypatch.setattr(bench_module.machine, "usable_cores", lambda *_: 2)

    def fixed_rounds(cands, runs, warmup):  # the first candidate noisy, the others steady
        for k, c in enumerate(cands):
            c.times, c.result = ([1.0, 2.0, 3.0, 4.0, 5.0] if k == 0 else [1.0] * 5), c.call()

    monkeypatch.setattr(bench_module, "rounds", fixed_rounds)
    lines = []
    result = bench(Session(make_model(), None, "torch"), batches=(1,), decoders=["ujd", "sjd"], runs=5,
                   log=lines.append)
    assert result["loaded"] is True and len(result["warnings"]) == 2 and result["machine"]["usable_cores"] == 2
    assert [r["noisy"] for r in result["runs"]] == [True, False]
    warned = [x for x in lines if x.startswith("bench: warning: ")]
    assert len(warned) == 2 and "9.50" in warned[0] and "2 usable cores" in warned[0] and "ujd 67%" in warned[1]
    text = table(result)
    assert all(w in text for w in warned) and "67%!" in text and "0% " in text
    assert max(len(line) for line in text.splitlines() if not line.startswith("bench: warning")) <= 130


def test_bench_and_sample_on_a_builtin_model_end_to_end(tmp_path, capsys):
    js = tmp_path / "b.json"
    assert main(["bench", "builtin:digits", "--backend", "torch", "--batch", "1", "--runs", "1", "--warmup", "0",
                 "--decoders", "forward,sequential,sjd", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "spread" in out and "rounds after 0 warm-up" in out
    data = json.loads(js.read_text())
    assert [r["decoder"] for r in data["runs"]] == ["forward", "sequential", "sjd"]
    assert all(r["single_token_path"] == "PyTorch" for r in data["runs"][1:])
    assert data["single_token_steps"] == "PyTorch"
    assert isinstance(data["loaded"], bool) and isinstance(data["warnings"], list) and "usable_cores" in data["machine"]
    sample_js = tmp_path / "s.json"
    assert main(["sample", "builtin:digits", "--backend", "torch", "-n", "1", "--plan", "sjd",
                 "--json", str(sample_js)]) == 0
    assert json.loads(sample_js.read_text())["single_token_path"] == "PyTorch"


def test_bench_refuses_a_negative_warmup(capsys):
    assert main(["bench", "builtin:digits", "--backend", "torch", "--warmup", "-1"]) == 2
    assert "--warmup must be >= 0" in capsys.readouterr().err
