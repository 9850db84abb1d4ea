"""`sejd check`'s options: tolerances, seeds, plan and graph selection, quick mode, saved failures."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sejd.cli import EXIT_CHECKS_FAILED, main
from sejd.export.bundle import sha256_file
from sejd.workflows.check import CheckOptions, check_bundle, select_graphs
from tests.test_cli import keep_progress_env  # noqa: F401 - autouse: restores SEJD_PROGRESS

POLYGRAPHY = Path(sys.executable).parent / "polygraphy"


def break_engine(bundle_path: Path, rel: str) -> None:
    """Scale every weight matrix of one built ort-cpu engine by 1.05 and re-hash it in the engine
    manifest: the engine loads as valid, but computes something else."""
    root = bundle_path / "engines" / "ort-cpu"
    model = onnx.load(root / rel)
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.05), init.name))
    onnx.save(model, root / rel)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][rel] = sha256_file(root / rel)
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def broken_bundle(tiny_bundle, tmp_path):
    path = tmp_path / "broken"
    shutil.copytree(tiny_bundle.path, path)
    break_engine(path, "blocks/0/jacobi.onnx")
    return path


def test_a_broken_graph_fails_and_the_printed_polygraphy_command_reproduces_it(tiny_bundle, broken_bundle, tmp_path,
                                                                                capsys):
    saved = tmp_path / "failures"
    rc = main(["check", str(broken_bundle), "--graphs", "block:0:jacobi,block:1:jacobi", "--plans", "none",
               "--save-failures", str(saved), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == EXIT_CHECKS_FAILED
    assert "FAIL  block 0 jacobi" in out and "PASS  block 1 jacobi" in out
    command = next(line.split("reproduce: ", 1)[1] for line in out.splitlines() if "reproduce: polygraphy run" in line)
    assert "engines/ort-cpu/blocks/0/jacobi.onnx --onnxrt" in command and "--atol 0.0001" in command
    for name in ("inputs", "outputs", "reference"):
        assert (saved / "block-0-jacobi" / f"{name}.json").is_file()
    if not POLYGRAPHY.exists():
        pytest.skip(f"polygraphy console script not at {POLYGRAPHY}")
    argv = [str(POLYGRAPHY)] + command.split()[1:]
    bad = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "FAILED" in bad.stdout + bad.stderr
    # the same saved inputs and reference outputs pass on the intact engine: the mismatch is the graph's
    intact = [a.replace(str(broken_bundle), str(tiny_bundle.path)) for a in argv]
    good = subprocess.run(intact, capture_output=True, text=True, timeout=600)
    assert good.returncode == 0, (good.stdout + good.stderr)[-2000:]


def test_tolerance_override_is_used_and_reported(tiny_bundle, capsys):
    report = check_bundle(tiny_bundle, "ort-cpu", show_progress=False,
                          options=CheckOptions(atol=1e-12, rtol=0.0, plans=(), graphs="block:0:step_present",
                                               show_progress=False, save_failures=None))
    (check,) = report.checks
    assert check.figures["atol"] == 1e-12 and check.figures["tolerance_from"] == "--atol"
    assert not report and check.reproduce.startswith("polygraphy run")  # round-off exceeds 1e-12
    assert "atol 1e-12" in report.scope["tolerance"]


def test_failures_go_to_a_new_folder_per_run_and_the_options_stay_as_given(tiny_bundle):
    options = CheckOptions(atol=1e-12, plans=(), graphs="block:0:step_present,block:1:jacobi", show_progress=False)
    first = check_bundle(tiny_bundle, "ort-cpu", options=options)
    assert options.save_failures is None  # not rewritten to the first run's temporary folder
    second = check_bundle(tiny_bundle, "ort-cpu", options=options)
    folders = {r.scope["failures_saved_in"] for r in (first, second)}
    assert len(folders) == 2 and None not in folders
    for report in (first, second):
        assert {c.saved_in for c in report.checks} == {report.scope["failures_saved_in"]}  # both graphs, one folder
        saved = Path(report.scope["failures_saved_in"])
        assert (saved / "block-0-step_present/inputs.json").is_file() and (saved / "block-1-jacobi/inputs.json").is_file()
        shutil.rmtree(saved)


def test_quick_mode_compares_fewer_feeds_and_says_what_it_skipped(tiny_bundle):
    report = check_bundle(tiny_bundle, "ort-cpu", options=CheckOptions(quick=True, show_progress=False))
    assert report
    s = report.scope
    assert s["quick"] and s["plan_batch"] == 1 and s["plans_compared"] == ["sjd"]
    assert set(s["plans_skipped"]) == {"sequential", "ujd", "gs-jacobi"}
    assert [(f["batch"], f["guidance_rows"]) for f in s["feeds"]] == [(1, False), (1, True)]
    assert "block 0 jacobi_loop" in s["graphs_skipped"] and "block 0 step_present" in s["graphs_compared"]
    assert all(c.figures["inputs"] <= 2 for c in report.checks if c.name.startswith("block"))
    summary = report.summary()
    assert "skipped: 12" in summary and "plans compared at batch 1" in summary


def test_seed_changes_the_inputs(tiny_bundle):
    def run(seed):
        r = check_bundle(tiny_bundle, "ort-cpu", options=CheckOptions(seed=seed, plans=(), graphs="block:0:jacobi",
                                                                      show_progress=False))
        return r.checks[0].figures["per_output_mean_abs"], [f["input_seed"] for f in r.scope["feeds"]]
    (errors0, seeds0), (errors5, seeds5) = run(0), run(5)
    assert seeds0 == [1, 3, 3, 11, 13, 13] and seeds5 == [51, 53, 53, 61, 63, 63]
    assert errors0 != errors5  # other inputs, other round-off


def test_graph_selectors():
    graphs = [{"block": k, "variant": v} for k in range(3) for v in ("step_present", "jacobi")] + \
             [{"block": None, "variant": "forward"}]
    chosen, skipped = select_graphs(graphs, "step_present,block:2", 3)
    assert [(g["block"], g["variant"]) for g in chosen] == [(0, "step_present"), (1, "step_present"),
                                                            (2, "step_present"), (2, "jacobi")]
    assert len(skipped) == 3
    assert select_graphs(graphs, "none", 3) == ([], graphs)
    assert select_graphs(graphs, "block:1:jacobi", 3)[0] == [{"block": 1, "variant": "jacobi"}]


@pytest.mark.parametrize("args,message", [
    (["--graphs", "block:9"], "names block '9'"),
    (["--graphs", "stepp"], "cannot read 'stepp'"),
    (["--graphs", "step_kv"], "cannot read 'step_kv'"),
    (["--graphs", "block:0:step"], "names variant 'step'"),
    (["--graphs", "block:0:forward"], "names variant 'forward'"),
    (["--plans", "fast"], "unknown plans ['fast']"),
    (["--plans", "auto"], "there is none"),
    (["--atol", "-1"], "--atol must be a finite number >= 0"),
    (["--config", '{"head_dim": 32}'], "--config applies to checkpoints"),
])
def test_bad_check_options_are_one_line_errors(tiny_bundle, capsys, args, message):
    assert main(["check", str(tiny_bundle.path), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sejd: error:") and message in err and len(err.strip().splitlines()) == 1


def test_check_takes_a_checkpoint_with_its_config(tmp_path, capsys):
    import torch

    from tests.conftest import make_model
    pth = tmp_path / "toy_model_2_64_4_2_0.05.pth"  # head_dim is not in the name: it comes from --config
    torch.save(make_model().state_dict(), pth)
    rc = main(["check", str(pth), "--config", '{"head_dim": 32}', "--plans", "sjd",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "plan sjd: engine vs PyTorch, same plan" in out and "on torch" in out


@pytest.mark.parametrize("verbose", [False, True])
def test_v_shows_polygraphys_log_on_stderr(tiny_bundle, capsys, verbose):
    argv = ["check", str(tiny_bundle.path), "--graphs", "block:0:step_present", "--plans", "none", "--no-progress"]
    assert main(argv + (["-v"] if verbose else [])) == 0
    out, err = capsys.readouterr()
    assert "PASS  block 0 step_present" in out and "[I]" not in out
    assert ("[I]" in err) == verbose  # Polygraphy's own log lines


def test_the_fused_step_graph_is_selected_like_the_others(tiny_bundle, capsys):
    """ort-cpu's fused step graph answers to `--graphs` as `step_fused` (engine graphs are selectable too)."""
    rc = main(["check", str(tiny_bundle.path), "--graphs", "block:3:step_fused", "--plans", "none", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "PASS  block 3 step_fused" in out and "1/1 enforced checks passed" in out
    graphs = [{"block": k, "variant": v} for k in range(2) for v in ("step_rows", "step_fused")]
    assert select_graphs(graphs, "step_fused", 2)[0] == [{"block": 0, "variant": "step_fused"},
                                                         {"block": 1, "variant": "step_fused"}]
