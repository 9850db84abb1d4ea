"""Every declared graph variant against the PyTorch reference, on ONNX Runtime (fp32, atol 1e-4)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sejd import save_checkpoint
from sejd.core.errors import InputError, SejdError
from sejd.export.bundle import SCHEMA_VERSION, BundleError, load_bundle
from sejd.export.contracts import VARIANTS, contract, dummy_inputs
from sejd.export.exporter import export_bundle
from sejd.export.oracle import reference_outputs
from sejd.runtime import decoders
from sejd.runtime.runner import Conditioning
from sejd.runtime.torch_runner import TorchBlockRunner
from tests.conftest import OTHER_BLOCKS, data_like, make_model

PARITY_TESTED = ["step_present", "step_rows", "window", "jacobi", "jacobi_k", "jacobi_loop", "sequential_loop", "forward"]
UNROLL = 4


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = make_model()
    save_checkpoint(model, root / "ckpt")
    return export_bundle(root / "ckpt", root / "bundle", variants=VARIANTS, unroll=UNROLL, show_progress=False)


@pytest.fixture(scope="module", params=["ml-tarflow", *OTHER_BLOCKS])
def any_bundle(request, bundle, tmp_path_factory):
    """The bundle of ml-tarflow's block, then of each other block (another MLP width, no biases): the parity
    tests below hold for every block the declaration describes."""
    if request.param == "ml-tarflow":
        return bundle
    root = tmp_path_factory.mktemp(request.param)
    save_checkpoint(make_model(**OTHER_BLOCKS[request.param]), root / "ckpt")
    return export_bundle(root / "ckpt", root / "bundle", variants=VARIANTS, unroll=UNROLL, show_progress=False)


def session(bundle, variant, block):
    return ort.InferenceSession(str(bundle.graph_path(variant, block)), providers=["CPUExecutionProvider"])


def test_every_declared_variant_has_a_parity_test():
    assert sorted(PARITY_TESTED) == sorted(VARIANTS)


CASES = [(v, b, r) for v in PARITY_TESTED for b, r in ((1, False), (3, False), (3, True))
         if not (v == "forward" and r)]  # the forward graph has no guidance rows


@pytest.mark.parametrize("variant,batch,cfg_rows", CASES)
def test_variant_matches_pytorch(any_bundle, variant, batch, cfg_rows):
    bundle = any_bundle
    model = bundle.load_model()
    c = contract(bundle.config, variant, UNROLL)
    blocks = [None] if variant == "forward" else range(bundle.config.num_blocks)
    for block in blocks:
        for seed, tau in ((batch, 0.0), (batch + 7, 0.3)):
            feeds = dummy_inputs(c, bundle.config, batch=batch, cfg_rows=cfg_rows, seed=seed, tau=tau)
            got = dict(zip(c.output_names, session(bundle, variant, block).run(None, feeds)))
            want = reference_outputs(model, block, c, feeds)
            assert set(got) == set(want)
            for name in c.output_names:
                assert got[name].shape == want[name].shape, name
                np.testing.assert_allclose(got[name], want[name], atol=c.atol, rtol=0, err_msg=f"{variant} {name}")


def test_jacobi_loop_iterations_equal_host_driven_jacobi(any_bundle):
    bundle = any_bundle
    model = bundle.load_model()
    cfg = bundle.config
    x = model.patchify(data_like(model, 2))
    c = contract(cfg, "jacobi_loop", UNROLL)
    for k in range(cfg.num_blocks):
        z = model.blocks[k].permute(x)
        runner = TorchBlockRunner(model.blocks[k], cfg.num_tokens, cfg.token_dim)
        runner.begin(2, Conditioning.build(2, cfg.num_tokens))
        for tau in (0.3, 1e-3, 0.0):
            host = decoders.jacobi(runner, z, torch.zeros_like(z), tau)
            feeds = {"z": z.numpy(), "x0": np.zeros_like(z.numpy()), "tau": np.array(tau, np.float32),
                     "max_iters": np.array(100, np.int64), "labels": np.full(2, -1, np.int64),
                     "temps": np.ones(2, np.float32), "guidance": np.zeros((2, cfg.num_tokens), np.float32)}
            out = dict(zip(c.output_names, session(bundle, "jacobi_loop", k).run(None, feeds)))
            assert int(out["iterations"]) == host.iterations
            np.testing.assert_allclose(out["x"], host.x.numpy(), atol=1e-4, rtol=0)
        assert host.iterations == cfg.num_tokens - 1  # tau = 0 runs to the cap, never past it


def test_sequential_loop_equals_sequential_stepping(any_bundle):
    bundle = any_bundle
    model = bundle.load_model()
    cfg = bundle.config
    z = model.patchify(data_like(model, 3, seed=4))
    runner = TorchBlockRunner(model.blocks[2], cfg.num_tokens, cfg.token_dim)
    labels = torch.tensor([1, -1, 4])
    runner.begin(3, Conditioning.build(3, cfg.num_tokens, labels))
    stepped = decoders.sequential(runner, z).x
    feeds = {"z": z.numpy(), "labels": labels.numpy(), "temps": np.ones(3, np.float32),
             "guidance": np.zeros((2, cfg.num_tokens), np.float32)}
    (x,) = session(bundle, "sequential_loop", 2).run(None, feeds)
    np.testing.assert_allclose(x, stepped.numpy(), atol=1e-4, rtol=0)


def test_every_graph_passes_the_full_onnx_checker_and_declares_its_contract(any_bundle):
    bundle = any_bundle
    for g in bundle.manifest["graphs"]:
        m = onnx.load(bundle.path / g["file"])
        onnx.checker.check_model(m, full_check=True)
        c = contract(bundle.config, g["variant"], UNROLL)
        assert [i.name for i in m.graph.input] == c.input_names
        assert [o.name for o in m.graph.output] == c.output_names


def test_graph_loads_in_polygraphy_run_onnxrt(bundle):
    path = bundle.graph_path("jacobi_loop", 1)
    T, D = bundle.config.num_tokens, bundle.config.token_dim
    shapes = [f"z:[2,{T},{D}]", f"x0:[2,{T},{D}]", "labels:[2]", "temps:[2]", f"guidance:[2,{T}]"]
    polygraphy = str(Path(sys.executable).parent / "polygraphy")  # the console script of the installed package
    proc = subprocess.run([polygraphy, "run", str(path), "--onnxrt",
                           "--input-shapes", *shapes], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "PASSED" in proc.stdout + proc.stderr


def test_manifest_pins_versions_hashes_and_config(bundle):
    m = bundle.manifest
    assert m["schema"] == SCHEMA_VERSION == 2 and m["config"] == bundle.config.to_dict() and m["opset"] == 18
    assert {"sejd", "torch", "onnx", "onnxruntime"} <= set(m["versions"])
    assert len(m["graphs"]) == 7 * bundle.config.num_blocks + 1
    assert all(len(d) == 64 for d in m["files"].values()) and "model/model.safetensors" in m["files"]


def copy_bundle(bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(bundle.path, dst)
    return dst


def test_changed_missing_and_foreign_files_are_refused(bundle, tmp_path):
    dst = copy_bundle(bundle, tmp_path)
    f = dst / "blocks/1/step_present.onnx"
    f.write_bytes(f.read_bytes()[:-10])  # truncated
    with pytest.raises(BundleError, match="blocks/1/step_present.onnx has changed"):
        load_bundle(dst)
    f.unlink()
    with pytest.raises(BundleError, match="blocks/1/step_present.onnx listed in the manifest is missing"):
        load_bundle(dst)
    shutil.copy(bundle.path / "blocks/1/step_present.onnx", f)
    (dst / "blocks/1/evil.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="foreign file blocks/1/evil.onnx"):
        load_bundle(dst)


def test_other_schema_version_is_refused(bundle, tmp_path):
    dst = copy_bundle(bundle, tmp_path)
    m = json.loads((dst / "manifest.json").read_text())
    m["schema"] = 99
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema version 99, this sejd reads version 2; re-export"):
        load_bundle(dst)
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(tmp_path)


def test_schema_1_bundle_is_refused_in_one_line_saying_how_to_re_export(bundle, tmp_path):
    """A bundle written before the single-token graphs were renamed (step -> step_present, step_kv ->
    step_rows) is refused, naming both schemas and the rename; the command it gives re-exports it."""
    dst = copy_bundle(bundle, tmp_path)
    m = json.loads((dst / "manifest.json").read_text())
    old_names = {"step_present": "step", "step_rows": "step_kv"}
    for g in m["graphs"]:
        if g["variant"] in old_names:
            old = g["file"].replace(g["variant"], old_names[g["variant"]])
            (dst / g["file"]).rename(dst / old)
            m["files"][old] = m["files"].pop(g["file"])
            g["variant"], g["file"] = old_names[g["variant"]], old
    m["schema"] = 1
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError) as e:
        load_bundle(dst)
    message = str(e.value)
    assert "\n" not in message and "schema version 1, this sejd reads version 2" in message
    assert "step and step_kv are now step_present and step_rows" in message
    command = message.split("`")[1].replace("NEW_BUNDLE", str(tmp_path / "again"))
    assert command == f"sejd export {dst / 'model'} -o {tmp_path / 'again'}"
    again = export_bundle(dst / "model", tmp_path / "again", variants=["step_rows"], show_progress=False)
    assert again.manifest["schema"] == 2 and again.variants() == ["step_rows"]


def test_export_refuses_to_overwrite_and_leaves_nothing_half_written(bundle, tmp_path, monkeypatch):
    with pytest.raises(SejdError, match="exists; pass --force"):
        export_bundle(bundle.path / "model", bundle.path)
    with pytest.raises(SejdError, match="unknown variants \\['magic'\\]"):
        export_bundle(bundle.path / "model", tmp_path / "b", variants=["magic"])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "important.txt").write_text("keep me")
    with pytest.raises(SejdError, match="is not a sejd bundle"):
        export_bundle(bundle.path / "model", tmp_path / "notes", force=True)
    assert (tmp_path / "notes" / "important.txt").read_text() == "keep me"
    # a failure after graphs were written: the temporary folder goes, the old bundle stays
    old = tmp_path / "old"
    shutil.copytree(bundle.path, old)
    import sejd.export.exporter as exporter

    def boom(*a, **k):
        raise SejdError("simulated failure")
    monkeypatch.setattr(exporter, "load_bundle", boom)
    with pytest.raises(SejdError, match="simulated failure"):
        export_bundle(bundle.path / "model", old, variants=["forward"], force=True)
    monkeypatch.undo()
    assert load_bundle(old).manifest == bundle.manifest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_force_replaces_a_bundle(bundle, tmp_path):
    old = tmp_path / "b"
    shutil.copytree(bundle.path, old)
    new = export_bundle(bundle.path / "model", old, variants=["forward"], force=True, show_progress=False)
    assert new.variants() == ["forward"] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_contract_validation_names_the_problem(bundle):
    c = contract(bundle.config, "jacobi", UNROLL)
    feeds = dummy_inputs(c, bundle.config, batch=2)
    bad = dict(feeds, x=feeds["x"][:, :5])
    with pytest.raises(InputError, match=r"input 'x' must have shape \('batch', 16, 12\), got \(2, 5, 12\)"):
        c.validate(bad)
    with pytest.raises(InputError, match="input 'z' must be float32, got float64"):
        c.validate(dict(feeds, z=feeds["z"].astype(np.float64)))
    with pytest.raises(InputError, match="has batch=3, but another input has batch=2"):
        c.validate(dict(feeds, x=np.zeros((3, 16, 12), np.float32)))
    with pytest.raises(InputError, match="rows must be batch or 2\\*batch"):
        c.validate(dict(feeds, temps=np.ones(3, np.float32), labels=np.zeros(3, np.int64)))


def test_contract_docs_are_generated_from_the_declarations():
    from pathlib import Path

    from sejd.export.contracts import markdown
    doc = Path(__file__).resolve().parents[2] / "docs" / "contracts.md"
    assert doc.read_text() == markdown() + "\n", "regenerate: python -m sejd.export.contracts > docs/contracts.md"


def _block_parameters(model) -> int:
    return sum(p.numel() for p in model.blocks[0].parameters())


def test_forward_graph_is_chained_from_per_block_bodies_never_traced_whole(tmp_path, monkeypatch):
    """Tracing the whole model at once held about twice its weights beside the model (7.5 GiB for a
    1.9 GB checkpoint): every module traced for `forward` must hold at most one block."""
    from sejd.export import onnx_export

    traced = []
    to_onnx = onnx_export._to_onnx
    monkeypatch.setattr(onnx_export, "_to_onnx", lambda module, *a, **k: (
        traced.append(sum(t.numel() for t in module.state_dict().values())), to_onnx(module, *a, **k))[1])
    model = make_model(num_blocks=5)
    save_checkpoint(model, tmp_path / "ckpt")
    b = export_bundle(tmp_path / "ckpt", tmp_path / "b", variants=["forward"], show_progress=False)
    assert len(traced) == 2 and max(traced) < 1.1 * _block_parameters(model)  # blocks 0 and 1; 2.. re-targeted
    w = b.manifest["weights"]
    assert (w["graphs_traced"], w["graphs_retargeted"]) == (2, 3)
    assert not (b.path / "forward.weights.bin").exists()


@pytest.mark.parametrize("overrides", [dict(num_classes=0, nvp=False, num_blocks=3), dict(num_blocks=1)],
                         ids=["unconditional-volume-preserving-3-blocks", "one-block"])
def test_chained_forward_graph_matches_pytorch_on_other_models(tmp_path, overrides):
    model = make_model(seed=2, **overrides)
    save_checkpoint(model, tmp_path / "ckpt")
    b = export_bundle(tmp_path / "ckpt", tmp_path / "b", variants=["forward"], show_progress=False)
    c = contract(b.config, "forward")
    onnx.checker.check_model(str(b.path / "forward.onnx"), full_check=True)
    m = onnx.load(b.path / "forward.onnx", load_external_data=False)
    assert [i.name for i in m.graph.input] == c.input_names and [o.name for o in m.graph.output] == c.output_names
    for batch in (1, 3):
        feeds = dummy_inputs(c, b.config, batch=batch, seed=batch)
        got = session(b, "forward", None).run(None, feeds)
        want = reference_outputs(model, None, c, feeds)
        for name, value in zip(c.output_names, got):
            np.testing.assert_allclose(value, want[name], atol=c.atol, rtol=0, err_msg=name)


def test_export_writes_only_the_default_variants_unless_asked(bundle, tmp_path):
    from sejd.cli import main
    from sejd.export.contracts import DEFAULT_VARIANTS

    default = export_bundle(bundle.path / "model", tmp_path / "default", show_progress=False)
    assert sorted(default.variants()) == sorted(DEFAULT_VARIANTS) and "sequential_loop" not in default.variants()
    assert main(["export", str(bundle.path / "model"), "-o", str(tmp_path / "all"), "--variants", "all",
                 "--unroll", "2", "--no-progress"]) == 0
    assert sorted(load_bundle(tmp_path / "all").variants()) == sorted(VARIANTS)
