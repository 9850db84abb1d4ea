"""ort-cpu's fused single-token step graph (sejd/engines/ort_fused_step.py): parity with the PyTorch reference
under the step_rows contract, what the build ships and records, the runners that use it, `sejd check`."""

import json
import logging
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sejd import InputError, load_checkpoint, sample
from sejd.engines import engine_dir
from sejd.engines import ort as ort_engines
from sejd.engines import ort_fused_step as fs
from sejd.engines.ort import (
    FUSED_PATH,
    STEP_ROWS_PATH,
    OrtBlockRunner,
    build_ort,
    ort_runners,
)
from sejd.export.bundle import load_bundle
from sejd.export.contracts import contract, dummy_inputs
from sejd.runtime.runner import Conditioning
from sejd.workflows.check import CheckOptions, check_bundle
from tests.conftest import OTHER_BLOCKS, make_model

PARITY_TESTED = ["step_fused"]  # the engine-only graph variants with a parity test in this file
ATOL = contract(make_model().config, "step_rows").atol  # the contract the fused step answers to: 1e-4


def test_every_engine_variant_has_a_parity_test():
    assert sorted(PARITY_TESTED) == sorted(fs.ENGINE_VARIANTS)


def session_of(block, num_tokens):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(fs.fused_step_graph(block, num_tokens).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def feeds_of(cfg, specs):
    c = contract(cfg, "step_rows")
    return [dummy_inputs(c, cfg, batch=b, cfg_rows=rows, seed=seed) for b, rows, seed in specs]


SPECS = [(1, False, 1), (1, True, 2), (3, False, 3), (3, True, 4), (2, True, 8)]


@pytest.mark.parametrize("source", ["builtin:digits", "builtin:textures", "nvp-false", *OTHER_BLOCKS])
def test_fused_step_equals_the_pytorch_reference_step(source):
    """Every block, batch 1 and 3, plain and with guidance rows (per-row temperatures, guidance weights,
    labels incl. -1 on the conditional digits model): the step_rows outputs within the contract's tolerance,
    and the caches changed nowhere but at the token's position."""
    if source in OTHER_BLOCKS:  # built from the block's declaration: no bias inputs where it has none
        model = make_model(**OTHER_BLOCKS[source])
    else:
        model = make_model(nvp=False) if source == "nvp-false" else load_checkpoint(source)
    cfg = model.config
    feeds = feeds_of(cfg, SPECS)
    if cfg.num_classes:
        assert any((f["labels"] == -1).any() for f in feeds) and any((f["labels"] >= 0).any() for f in feeds)
    assert any(f["temps"].shape[0] == 2 * f["x"].shape[0] and (f["temps"] != 1).any() for f in feeds)
    for k, block in enumerate(model.blocks):
        result = fs.compare(session_of(block, cfg.num_tokens), fs.dims_of(block.spec), model, k, feeds, ATOL)
        assert result["passed"] and result["max_abs"] <= ATOL, (k, result)
        assert result["per_output_max_abs"]["unchanged"] == 0.0
        assert set(result["per_output_max_abs"]) == {"xa", "xb", "unchanged",
                                                     *[f"new.{n}" for n in fs.cache_names(cfg.layers_per_block)]}
    graph = fs.fused_step_graph(model.blocks[0], cfg.num_tokens).graph
    assert any(i.name.endswith(".bias") for i in graph.initializer) == cfg.bias  # biases exactly where declared


def test_any_negative_label_is_the_class_mean():
    model = load_checkpoint("builtin:digits")
    cfg = model.config
    (feeds,) = feeds_of(cfg, [(3, True, 5)])
    feeds["labels"] = np.array([-3, 2, -1, -7, -1, -2], np.int64)
    got = fs.fused_call_on_feeds(session_of(model.blocks[0], cfg.num_tokens), fs.dims_of(model.blocks[0].spec), feeds)
    from sejd.export.oracle import reference_outputs
    want = reference_outputs(model, 0, contract(cfg, "step_rows"), feeds)
    np.testing.assert_allclose(got["xa"], want["xa"], atol=ATOL, rtol=0)


def test_a_wrong_graph_fails_the_comparison():
    """The comparison can fail: a graph whose block differs from the reference's by 1 % in one weight."""
    model = load_checkpoint("builtin:textures")
    other = load_checkpoint("builtin:textures")
    with torch.no_grad():
        other.blocks[1].attn_blocks[1].mlp.main[2].weight.mul_(1.01)
    T = model.config.num_tokens
    result = fs.compare(session_of(other.blocks[1], T), fs.dims_of(model.blocks[1].spec), model, 1,
                        feeds_of(model.config, SPECS[:2]), ATOL)
    assert not result["passed"] and result["max_abs"] > ATOL


# --- the build --------------------------------------------------------------------------------------------


def test_the_build_ships_the_fused_step_with_its_weights_stored_once(tiny_bundle):
    folder = engine_dir(tiny_bundle, "ort-cpu")
    m = json.loads((folder / "manifest.json").read_text())
    record = m["step_fused"]
    assert record["contract"] == "step_rows" and record["atol"] == ATOL
    assert {(p["batch"], p["guidance_rows"]) for p in record["parity_inputs"]} == {(1, False), (1, True), (3, False),
                                                                                   (3, True)}
    for k in range(tiny_bundle.config.num_blocks):
        entry = record["blocks"][str(k)]
        assert entry["used"] and entry["max_abs"] <= ATOL and entry["file"] == f"blocks/{k}/step_fused.onnx"
        assert entry["file"] in m["files"]  # hashed and verified at load like every engine file
        offsets = {}
        for variant in ("step_rows", "step_fused"):
            graph = onnx.load(folder / f"blocks/{k}/{variant}.onnx", load_external_data=False)
            offsets[variant] = {t.name: {e.key: e.value for e in t.external_data}
                                for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        fused = offsets["step_fused"]
        assert {i["location"] for i in fused.values()} == {"weights.bin"}
        # every Linear weight (transposed, as the exported graphs store it) is the step_rows graph's own bytes
        shared = {(i["offset"], i["length"]) for i in offsets["step_rows"].values()}
        linear = [name for name in fused if name.endswith(".weight.T")]
        assert len(linear) == 2 + 4 * tiny_bundle.config.layers_per_block
        assert all((fused[n]["offset"], fused[n]["length"]) in shared for n in linear)
        assert (fused["pos_table"]["offset"], fused["pos_table"]["length"]) in shared


@pytest.fixture
def corrupted_build(tiny_bundle, tmp_path, monkeypatch):
    """The tiny bundle built again with the fused graphs of the flipped blocks (1 and 3) corrupted: one weight
    of their last MLP scaled by 1.05."""
    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, path)
    real = fs.fused_step_graph

    def corrupt(block, num_tokens):
        graph = real(block, num_tokens)
        if block.flip:
            from onnx import numpy_helper
            for init in graph.graph.initializer:
                if init.name == "attn_blocks.1.mlp.main.2.weight.T":
                    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.05), init.name))
        return graph

    monkeypatch.setattr(fs, "fused_step_graph", corrupt)
    bundle = load_bundle(path)
    build_ort(bundle, "ort-cpu", show_progress=False)
    return bundle


def test_a_fused_step_that_fails_parity_is_not_shipped_and_the_manifest_says_why(corrupted_build, monkeypatch):
    folder = engine_dir(corrupted_build, "ort-cpu")
    m = json.loads((folder / "manifest.json").read_text())
    blocks = m["step_fused"]["blocks"]
    assert blocks["0"]["used"] and blocks["2"]["used"]
    for k in ("1", "3"):
        assert not blocks[k]["used"] and "parity failed against the PyTorch reference" in blocks[k]["reason"]
        assert "tolerance 0.0001" in blocks[k]["reason"]
        assert f"blocks/{k}/step_fused.onnx" not in m["files"] and not (folder / f"blocks/{k}/step_fused.onnx").exists()
    monkeypatch.setenv("SEJD_NATIVE_STEP", "0")
    runners = ort_runners(corrupted_build)
    assert [r.single_token_path for r in runners] == [FUSED_PATH, STEP_ROWS_PATH, FUSED_PATH, STEP_ROWS_PATH]
    model = corrupted_build.load_model()
    noise = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(2))
    kw = dict(labels=torch.tensor([1, -1]), plan="sequential", guidance=1.5, progress=False)
    torch.testing.assert_close(sample(model, noise, runners=runners, **kw).images, sample(model, noise, **kw).images,
                               atol=1e-4, rtol=0)


def test_reduced_precision_engines_record_why_there_is_no_fused_step(tiny_bundle):
    files, record = ort_engines._fused_steps(tiny_bundle, "ort-cpu", "fp16", None, None, None, None, False)
    assert files == {} and all(not b["used"] and "fp32 only" in b["reason"] for b in record["blocks"].values())
    assert len(record["blocks"]) == tiny_bundle.config.num_blocks
    assert ort_engines._fused_steps(tiny_bundle, "ort-cuda", "fp32", None, None, None, None, False) is None


# --- the runners ------------------------------------------------------------------------------------------


@pytest.fixture
def onnx_runners(tiny_bundle, monkeypatch):
    """ort-cpu runners without the native step (as on a machine without a C compiler)."""
    monkeypatch.setenv("SEJD_NATIVE_STEP", "0")
    return lambda: ort_runners(tiny_bundle)


@pytest.mark.parametrize("plan", ["sequential", "sjd", "gs-jacobi"])
def test_sampling_with_the_fused_step_equals_sampling_with_step_rows(tiny_bundle, onnx_runners, plan):
    fused = onnx_runners()
    rows = onnx_runners()
    for r in rows:
        r.fused = None  # the exported step_rows graph instead
    assert all(type(r) is OrtBlockRunner for r in fused)
    assert {r.single_token_path for r in fused} == {FUSED_PATH} and {r.single_token_path for r in rows} == {STEP_ROWS_PATH}
    model = tiny_bundle.load_model()
    noise = torch.randn(3, 16, 12, generator=torch.Generator().manual_seed(5))
    kw = dict(labels=torch.tensor([0, -1, 3]), plan=plan, guidance=1.0, attn_temp=0.8, progress=False)
    got = sample(model, noise, runners=fused, **kw)
    torch.testing.assert_close(got.images, sample(model, noise, runners=rows, **kw).images, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.images, sample(model, noise, **kw).images, atol=1e-4, rtol=0)


def test_the_fused_step_writes_the_runners_own_caches_in_place(tiny_bundle, onnx_runners):
    runner = onnx_runners()[2]
    cond = Conditioning.build(2, 16, labels=torch.tensor([1, 4]), guidance=2.0, attn_temp=0.7)
    runner.begin(2, cond)
    side, caches = runner._current, runner._caches[runner._current]
    before = [c.copy() for c in caches]
    x = torch.randn(2, 12, generator=torch.Generator().manual_seed(0))
    xa, xb = runner.step(x, 5)
    assert runner._current == side  # no ping-pong: the same buffers hold the cache
    from sejd.runtime.torch_runner import TorchBlockRunner
    model = tiny_bundle.load_model()
    ref = TorchBlockRunner(model.blocks[2], 16, 12)
    ref.begin(2, cond)
    for (k, v), a, b in zip(ref.cache, before[0::2], before[1::2]):
        k.copy_(torch.from_numpy(a))
        v.copy_(torch.from_numpy(b))
    want_a, want_b = ref.step(x, 5)
    torch.testing.assert_close(xa, want_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(xb, want_b, atol=ATOL, rtol=0)
    flat = [t for pair in ref.cache for t in pair]  # keys and values per layer: the runner's cache order
    for got, want, old in zip(caches, flat, before):
        np.testing.assert_allclose(got[:, :, 5], want[:, :, 5].numpy(), atol=ATOL, rtol=0)
        np.testing.assert_array_equal(np.delete(got, 5, axis=2), np.delete(old, 5, axis=2))
    xa2, _ = runner.step(x, 5)  # fresh output arrays: an earlier result is not overwritten
    assert xa2.data_ptr() != xa.data_ptr()


def test_the_fused_step_checks_its_inputs_before_the_call(onnx_runners):
    runner = onnx_runners()[0]
    runner.begin(2, Conditioning.build(2, 16))
    with pytest.raises(InputError, match=r"position must be in \[0, 16\), got 16"):
        runner.step(torch.zeros(2, 12), 16)  # the graph would write past the cache
    with pytest.raises(InputError, match="must be float32, got float64"):
        runner.step(torch.zeros(2, 12, dtype=torch.float64), 0)
    with pytest.raises(InputError, match="must have shape"):
        runner.project(torch.zeros(2, 1, 11), 0)


def test_without_the_native_step_one_warning_per_reason_names_the_graph(tiny_bundle, monkeypatch, caplog):
    monkeypatch.setenv("SEJD_NATIVE_STEP", "0")
    monkeypatch.setattr(ort_engines, "_WARNED", set())
    with caplog.at_level(logging.INFO, logger="sejd.ort"):
        ort_runners(tiny_bundle)
        ort_runners(tiny_bundle)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "SEJD_NATIVE_STEP=0" in warnings[0].getMessage() and FUSED_PATH in warnings[0].getMessage()


def test_the_warning_says_why_there_is_no_fused_step(corrupted_build, monkeypatch, caplog):
    monkeypatch.setenv("SEJD_NATIVE_STEP", "0")
    monkeypatch.setattr(ort_engines, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="sejd.ort"):
        ort_runners(corrupted_build)
    (message,) = [r.getMessage() for r in caplog.records]
    assert f"{FUSED_PATH} (blocks 0, 2) and the {STEP_ROWS_PATH} (blocks 1, 3)" in message
    assert "no fused step graph for blocks 1, 3: parity failed against the PyTorch reference" in message


# --- sejd check -------------------------------------------------------------------------------------------


def test_check_selects_and_fails_a_drifting_fused_step(tiny_bundle, monkeypatch):
    options = CheckOptions(plans=(), graphs="block:1:step_fused,block:2", show_progress=False)
    report = check_bundle(tiny_bundle, "ort-cpu", options=options)
    fused = [c for c in report.checks if c.name.endswith("step_fused")]
    assert report and [c.name for c in fused] == ["block 1 step_fused", "block 2 step_fused"]
    assert all(c.figures["max_abs"] <= c.figures["atol"] == ATOL for c in fused)
    assert "block 0 step_fused" in report.scope["graphs_skipped"]

    real = fs.FusedStep.__call__

    def drifting(self, x, pos):  # 2e-4 off: twice the contract's tolerance
        xa, xb = real(self, x, pos)
        return xa, xb + 2e-4

    monkeypatch.setattr(fs.FusedStep, "__call__", drifting)
    report = check_bundle(tiny_bundle, "ort-cpu", options=CheckOptions(plans=(), graphs="step_fused",
                                                                       show_progress=False))
    failed = {c.name: c.figures for c in report.checks if not c.passed}
    assert not report and set(failed) == {f"block {k} step_fused" for k in range(4)}
    assert all(f["worst_output"] == "xb" and 2e-4 <= f["max_abs"] < 3e-4 for f in failed.values())


def test_the_engine_manifest_says_which_path_runs_single_tokens(tiny_bundle, monkeypatch, tmp_path):
    """Recorded at build (the runners decide again at each load): the native step where it loads, else the
    fused step graph, with the reason."""
    from sejd.engines import native, native_lib
    from sejd.engines.ort import _single_token_path_at_build

    manifest = json.loads((tiny_bundle.path / "engines" / "ort-cpu" / "manifest.json").read_text())
    if native.available() is None:
        assert manifest["single_token_path"] == f"native CPU step ({native.level()})"
    monkeypatch.setattr(native_lib, "LIB_DIR", tmp_path)  # an install that built no library
    native.forget()
    try:
        path = _single_token_path_at_build(tiny_bundle, "fp32", ({}, manifest["step_fused"]))
        assert path.startswith("fused ONNX step graph (native CPU step not used: ") and "not built for" in path
        assert _single_token_path_at_build(tiny_bundle, "fp16", None).startswith(
            "ONNX step_rows graph (native CPU step not used: engines built at fp16")
    finally:
        monkeypatch.undo()
        native.forget()
