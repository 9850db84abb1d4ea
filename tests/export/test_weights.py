"""Weights stored once: shared, content-addressed external data for every graph of a bundle."""

import errno
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sejd import save_checkpoint
from sejd.core.errors import SejdError
from sejd.export import exporter
from sejd.export.bundle import BundleError, load_bundle
from sejd.export.contracts import VARIANTS, contract, dummy_inputs
from sejd.export.exporter import export_bundle
from sejd.export.onnx_export import export_block_variant
from sejd.export.weights import (
    ALIGN,
    INLINE_MAX_BYTES,
    WeightStore,
    all_tensors,
    save_external,
)
from tests.conftest import make_model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    save_checkpoint(make_model(), root / "ckpt")
    return export_bundle(root / "ckpt", root / "bundle", variants=VARIANTS, unroll=2, show_progress=False)


def external_locations(path):
    m = onnx.load(path, load_external_data=False)
    locations, inline_max = set(), 0
    for t in all_tensors(m):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            locations.add({e.key: e.value for e in t.external_data}["location"])
        else:
            inline_max = max(inline_max, len(t.raw_data))
    return locations, inline_max


def test_equal_tensors_are_stored_once_at_one_aligned_offset(tmp_path):
    with WeightStore(tmp_path) as store:
        store.target("w.bin")
        a = store.put(b"\1" * 100)
        big = store.put(b"\2" * ALIGN)
        assert store.put(b"\1" * 100) == a
        store.target("other.bin")
        assert store.put(b"\2" * ALIGN) == big  # equal content in another file's graph: still stored once
    assert big[1] % ALIGN == 0 and store.bytes_written == 100 + ALIGN and store.bytes_deduplicated == 100 + ALIGN
    assert store.files() == ["w.bin"] and not (tmp_path / "other.bin").exists()


def test_every_graph_of_a_block_references_one_shared_weight_file(bundle):
    model = bundle.load_model()
    for k in range(bundle.config.num_blocks):
        for g in [g for g in bundle.manifest["graphs"] if g["block"] == k]:
            locations, inline_max = external_locations(bundle.path / g["file"])
            assert locations == {"weights.bin"}, g["file"]
            assert inline_max <= INLINE_MAX_BYTES, g["file"]
        params = sum(p.numel() * 4 for p in model.blocks[k].parameters())
        # one copy of the block's weights (plus alignment), not one per variant (7 before)
        assert (bundle.path / f"blocks/{k}/weights.bin").stat().st_size < 1.5 * params
    assert f"blocks/{k}/weights.bin" in bundle.manifest["files"]


def test_forward_graph_reuses_the_blocks_weight_files(bundle):
    locations, _ = external_locations(bundle.path / "forward.onnx")
    block_files = {f"blocks/{k}/weights.bin" for k in range(bundle.config.num_blocks)}
    assert locations == block_files  # chained from per-block bodies: no weights of its own
    w = bundle.manifest["weights"]
    assert w["inline_max_bytes"] == INLINE_MAX_BYTES and set(w["weight_files"]) == block_files
    assert w["deduplicated_bytes"] > 5 * w["weight_bytes"]


def test_a_graph_whose_tensors_sit_in_per_tensor_files_is_rebased(bundle, tmp_path):
    """What torch writes for a graph over protobuf's 2 GB (each tensor in its own file beside the graph, its
    Constants' values too, loaded with load_external_data=False) goes into the shared store like an inline
    graph; shown on a small graph saved that way, since torch only takes that path above 2 GB."""
    model, cfg = bundle.load_model(), bundle.config
    graph = export_block_variant(model, 1, "jacobi", 1, 18)
    (tmp_path / "torch").mkdir()
    onnx.save_model(graph, tmp_path / "torch" / "g.onnx", save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0, convert_attribute=True)
    loaded = onnx.load(tmp_path / "torch" / "g.onnx", load_external_data=False)
    assert any(n.op_type == "Constant" and n.attribute[0].t.data_location == onnx.TensorProto.EXTERNAL
               for n in loaded.graph.node)
    with WeightStore(tmp_path / "out") as store:
        store.target("blocks/1/weights.bin")
        path = save_external(loaded, "blocks/1/jacobi.onnx", store, base_dir=tmp_path / "torch")
    shutil.rmtree(tmp_path / "torch")
    onnx.checker.check_model(str(path), full_check=True)
    c = contract(cfg, "jacobi")
    feeds = dummy_inputs(c, cfg, batch=2)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    want = ort.InferenceSession(str(bundle.graph_path("jacobi", 1)), providers=["CPUExecutionProvider"]).run(None, feeds)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("damage", ["missing", "truncated", "altered"])
def test_a_damaged_shared_weight_file_is_refused_by_name(bundle, tmp_path, damage):
    dst = tmp_path / "b"
    shutil.copytree(bundle.path, dst)
    f = dst / "blocks/2/weights.bin"
    data = f.read_bytes()
    if damage == "missing":
        f.unlink()
    else:
        f.write_bytes(data[:-64] if damage == "truncated" else data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(BundleError, match="blocks/2/weights.bin"):
        load_bundle(dst)


def test_disk_full_during_export_leaves_nothing_and_says_so(bundle, tmp_path, monkeypatch):
    def full(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(WeightStore, "put", full)
    with pytest.raises(SejdError, match=r"^cannot write .*/b: No space left on device") as e:
        export_bundle(bundle.path / "model", tmp_path / "b", variants=["step_present"], show_progress=False)
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no bundle, no temporary folder, no scratch


def test_config_is_passed_to_the_checkpoint_loader(tmp_path):
    model = make_model(head_dim=16, num_blocks=2)  # head_dim cannot be read from the tensors (guessed 64)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    b = export_bundle(tmp_path / "plain.pth", tmp_path / "b", variants=["step_present"], show_progress=False,
                      config=model.config.to_dict())
    assert b.config.head_dim == 16


def test_geometry_source_is_recorded_in_the_manifest(tmp_path, monkeypatch):
    model = make_model(num_blocks=2)
    model.noise_std = 0.0
    model.meta = {"geometry": {"source": "shapes", "patch_size": 2, "in_channels": 3}}
    monkeypatch.setattr(exporter, "load_checkpoint", lambda source, config=None: model)
    b = export_bundle("whatever.pth", tmp_path / "b", variants=["step_present"], show_progress=False)
    assert b.manifest["geometry"] == model.meta["geometry"]
    assert json.loads((tmp_path / "b/model/config.json").read_text())["geometry"]["source"] == "shapes"


def test_blocks_after_the_first_two_are_retargeted_and_match_pytorch(bundle):
    w = bundle.manifest["weights"]
    blocks = bundle.config.num_blocks
    # 7 block variants and the forward graph's per-block bodies: traced for blocks 0 and 1 only
    assert (w["graphs_traced"], w["graphs_retargeted"]) == (8 * 2, 8 * (blocks - 2))
    # block 3's graphs were re-targeted from block 0's (odd block: flipped position table)
    model = bundle.load_model()
    from sejd.export.oracle import reference_outputs
    for variant in ("step_present", "jacobi_loop"):
        c = contract(bundle.config, variant, 2)
        feeds = dummy_inputs(c, bundle.config, batch=2, seed=5)
        got = ort.InferenceSession(str(bundle.graph_path(variant, 3)), providers=["CPUExecutionProvider"]).run(None, feeds)
        want = reference_outputs(model, 3, c, feeds)
        for name, value in zip(c.output_names, got):
            np.testing.assert_allclose(value, want[name], atol=c.atol, rtol=0)


def test_retarget_refuses_when_it_cannot_tell_which_tensor_an_initializer_comes_from():
    from onnx import helper

    from sejd.export.weights import Retarget

    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    init = onnx.numpy_helper.from_array(w.T.contiguous().numpy(), "W")  # stored transposed, as MatMul's operand
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", 1, [1, 3])],
                              [helper.make_tensor_value_info("y", 1, [1, 2])], [init])
    template = Retarget(helper.make_model(graph), None, {"a": w, "b": w.clone()})  # a and b equal in block 0
    other = torch.ones(2, 3)
    assert template.graph({"a": other, "b": -other}) is None
    got = template.graph({"a": other * 2, "b": other * 2}).graph.initializer[0]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(got), (other * 2).T.numpy())


def test_a_tensor_equal_in_two_blocks_is_stored_in_each_blocks_file(tmp_path):
    model = make_model(num_blocks=3)
    model.blocks[2].proj_in.weight.copy_(model.blocks[0].proj_in.weight)  # 3 KB: stored externally
    save_checkpoint(model, tmp_path / "ckpt")
    b = export_bundle(tmp_path / "ckpt", tmp_path / "b", variants=["step_present"], show_progress=False)
    # ONNX and ONNX Runtime refuse external data outside the graph's folder: no ../0/weights.bin
    assert external_locations(b.path / "blocks/2/step_present.onnx")[0] == {"weights.bin"}
    ort.InferenceSession(str(b.graph_path("step_present", 2)), providers=["CPUExecutionProvider"])


def test_a_retargeted_graph_with_external_weights_loads_in_polygraphy_run_onnxrt(bundle):
    import subprocess
    import sys
    from pathlib import Path

    T, D = bundle.config.num_tokens, bundle.config.token_dim
    shapes = [f"z:[2,{T},{D}]", f"x:[2,{T},{D}]", "labels:[2]", "temps:[2]", f"guidance:[2,{T}]"]
    polygraphy = str(Path(sys.executable).parent / "polygraphy")
    proc = subprocess.run([polygraphy, "run", str(bundle.graph_path("jacobi", 3)), "--onnxrt", "--input-shapes",
                           *shapes], capture_output=True, text=True)
    assert proc.returncode == 0 and "PASSED" in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
