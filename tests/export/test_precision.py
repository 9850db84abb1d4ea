"""Reduced precision: written into the graph (fp16/bf16 matrix products, LayerNorm/softmax/exp in fp32,
float32 inputs and outputs) and held to the per-precision tolerances against the fp32 reference."""

import numpy as np
import pytest
import torch

from sejd.core.errors import SejdError
from sejd.engines.ort import build_ort
from sejd.export.contracts import FP32_ATOL, contract, dummy_inputs, tolerance
from sejd.export.graphs import PRECISIONS, graph_module
from sejd.export.onnx_export import export_block_variant
from sejd.export.oracle import reference_outputs
from sejd.export.precision import KEPT_FP32, op_input_types
from sejd.workflows.check import check_bundle
from tests.conftest import make_model

SINGLE_CALL = ("step_present", "step_rows", "window", "jacobi", "jacobi_k")
ONNX_TYPE = {"fp16": "FLOAT16", "bf16": "BFLOAT16"}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("variant", SINGLE_CALL)
def test_reduced_graphs_keep_norms_softmax_and_exp_in_fp32(precision, variant):
    model = make_model()
    onnx_model = export_block_variant(model, 1, variant, 3, 18, PRECISIONS[precision])
    types = op_input_types(onnx_model)
    for op in KEPT_FP32:
        assert set(types.get(op, {})) <= {"FLOAT"}, (op, types.get(op))
    assert types["LayerNormalization"]["FLOAT"] == 2 * 2 * (3 if variant == "jacobi_k" else 1)  # 2 layers x 2 norms
    assert set(types["MatMul"]) == {ONNX_TYPE[precision]}  # every matrix product in the reduced type
    c = contract(model.config, variant, 3)
    io = {v.name: v.type.tensor_type.elem_type for v in [*onnx_model.graph.input, *onnx_model.graph.output]}
    for spec in c.inputs + c.outputs:  # the contract is the same at every precision
        assert io[spec.name] == (1 if spec.dtype == "float32" else 7), spec.name


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("variant", SINGLE_CALL)
def test_reduced_graph_modules_are_within_their_tolerance(precision, variant):
    model = make_model()
    c = contract(model.config, variant, 3)
    worst = 0.0
    for seed, cfg_rows in ((0, False), (1, True)):
        feeds = dummy_inputs(c, model.config, batch=3, cfg_rows=cfg_rows, seed=seed)
        with torch.no_grad():
            out = graph_module(model, 2, variant, 3, PRECISIONS[precision])(
                *[torch.from_numpy(feeds[n]) for n in c.input_names])
        ref = reference_outputs(model, 2, c, feeds)
        for name, o in zip(c.output_names, out):
            assert o.dtype == torch.float32
            worst = max(worst, float(np.abs(o.numpy() - ref[name]).max()))
    assert FP32_ATOL < worst <= tolerance(c, precision)  # really reduced, and within the documented bound


def test_fp16_engines_pass_check_at_fp16_tolerances(tmp_path):
    from sejd import save_checkpoint
    from sejd.export.exporter import export_bundle

    save_checkpoint(make_model(), tmp_path / "ckpt")
    bundle = export_bundle(tmp_path / "ckpt", tmp_path / "b", unroll=3, show_progress=False,
                           variants=["step_present", "step_rows", "window", "jacobi", "jacobi_k", "sequential_loop", "forward"])
    build_ort(bundle, "ort-cpu", show_progress=False, precision="fp16")
    report = check_bundle(bundle, "ort-cpu", show_progress=False)
    assert report, report.summary()
    graphs = [c for c in report.checks if c.name.startswith("block ")]
    assert len(graphs) == 4 * 6
    assert {c.figures["precision"] for c in graphs} == {"fp16"}
    assert all(c.figures["atol"] == tolerance(contract(bundle.config, c.name.split()[-1], 3), "fp16") for c in graphs)
    assert max(c.figures["max_abs"] for c in graphs) > FP32_ATOL  # the engines do compute in fp16
    (forward,) = [c for c in report.checks if c.name == "forward"]
    assert forward.figures["precision"] == "fp32" and forward.figures["atol"] == FP32_ATOL  # always built fp32
    plans = [c for c in report.checks if "same plan" in c.name]
    assert plans and all(c.figures["psnr_floor_db"] == 45.0 for c in plans)


def test_reduced_precision_cli_errors_and_reports(tiny_bundle, tmp_path, capsys):
    import shutil

    from sejd.cli import main

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, bundle)  # the shared bundle's fp32 engines stay untouched
    before = (bundle / "engines/ort-cpu/manifest.json").read_text()
    assert main(["build", str(bundle), "--backend", "ort-cpu", "--precision", "bf16"]) == 2
    assert "CPU provider has no bf16 matrix product" in capsys.readouterr().err
    assert (bundle / "engines/ort-cpu/manifest.json").read_text() == before  # a refused build changes nothing
    assert main(["sample", str(bundle), "--backend", "torch:fp16", "-n", "1"]) == 2
    assert "the PyTorch reference runs in fp32" in capsys.readouterr().err
    assert main(["sample", str(bundle), "--backend", "torch-cuda:", "-n", "1"]) == 2
    assert "empty precision" in capsys.readouterr().err
    assert main(["build", str(bundle), "--backend", "ort-cpu", "--precision", "fp16"]) == 0
    assert main(["sample", str(bundle), "-n", "1", "--plan", "sequential", "--out", str(tmp_path / "s.png")]) == 0
    assert "backend ort-cpu (fp16)" in capsys.readouterr().out


def test_failed_engine_build_keeps_the_previous_engines(tiny_bundle, tmp_path, monkeypatch):
    import shutil

    import onnxruntime

    from sejd.engines.ort import load_engine_manifest

    bundle_path = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, bundle_path)
    from sejd.export.bundle import load_bundle
    bundle = load_bundle(bundle_path)
    calls = {"n": 0}
    real = onnxruntime.InferenceSession

    def failing_late(*args, **kwargs):  # the fifth graph fails to build
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated provider failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", failing_late)
    with pytest.raises(SejdError, match="cannot build the fp16 .* simulated provider failure"):
        build_ort(bundle, "ort-cpu", show_progress=False, precision="fp16")
    assert load_engine_manifest(bundle, "ort-cpu")["precision"] == "fp32"  # still the old, complete engines
    assert not [p for p in (bundle_path / "engines").iterdir() if p.name.startswith(".")]  # no scratch left
