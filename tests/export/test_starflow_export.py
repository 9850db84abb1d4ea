"""STARFlow bundles: every graph of a tiny text-conditioned STARFlow (heterogeneous depth, layers (1, 1, 2), text
Lt 4 on the deep block, 4x4 grid) against the PyTorch reference (oracle.py) at batch 1 and 2, with and without
guidance rows; ort-cpu runners sampling with text against the torch path; `sejd check`; refused inputs.
Tolerances: each contract's atol (1e-4, float32) per graph; 1e-4 absolute on sampled latents."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sejd.core.errors import InputError, SejdError
from sejd.export.bundle import load_bundle
from sejd.export.contracts import STARFLOW_VARIANTS, contract, dummy_inputs
from sejd.export.exporter import export_bundle
from sejd.export.oracle import reference_outputs
from sejd.model.starflow import StarFlowConfig
from sejd.model.starflow_checkpoint import build_starflow
from sejd.runtime.runner import Conditioning
from sejd.runtime.sampler import sample
from tests.model import starflow_oracle as so
from tests.model.test_starflow import TINY, _data

CFG = {**TINY, "txt_size": 4}  # layers (1, 1, 2), text 4 x 12 on blocks[-1], 2 heads of 32, 4x4 grid, L2R
UNROLL = 3
STARFLOW_PARITY_TESTED = ["prefix", "step_present", "step_rows", "window", "jacobi", "jacobi_k"]


def _model(cfg=CFG, seed=0):
    return build_starflow(so.random_state_dict(cfg, seed=seed), StarFlowConfig.from_dict(cfg))


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("starflow")
    return export_bundle(model, root / "bundle", variants=STARFLOW_VARIANTS, unroll=UNROLL, show_progress=False)


@pytest.fixture(scope="module")
def built(bundle):
    from sejd.engines.ort import build_ort

    build_ort(bundle, "ort-cpu", show_progress=False)
    return bundle


def test_every_starflow_variant_has_a_parity_test():
    assert sorted(STARFLOW_PARITY_TESTED) == sorted(STARFLOW_VARIANTS)


def test_manifest_rebuilds_the_starflow_and_lists_per_block_graphs(bundle, model):
    m = bundle.manifest
    assert m["family"] == "starflow" and "forward" in m["note"] and m["config"] == model.config.to_dict()
    assert isinstance(bundle.config, StarFlowConfig)
    per_block = {k: sorted(g["variant"] for g in m["graphs"] if g["block"] == k) for k in range(3)}
    assert per_block[2] == sorted(STARFLOW_VARIANTS)  # the text block has `prefix`
    assert per_block[0] == per_block[1] == sorted(v for v in STARFLOW_VARIANTS if v != "prefix")
    loaded = bundle.load_model()
    assert type(loaded).__name__ == "StarFlow"
    for (k, a), b in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    for g in m["graphs"]:  # each graph declares its block's own contract (depth, cache slots, text prefix)
        onnx.checker.check_model(str(bundle.path / g["file"]), full_check=True)
        proto = onnx.load(bundle.path / g["file"], load_external_data=False)
        c = contract(bundle.config, g["variant"], UNROLL, block=g["block"])
        assert [i.name for i in proto.graph.input] == c.input_names == [s["name"] for s in g["inputs"]]
        assert [o.name for o in proto.graph.output] == c.output_names
    step = contract(bundle.config, "step_rows", block=2)
    assert {s.name: s.shape for s in step.inputs}["past.1.key"] == ("rows", 2, 4 + 16 + 1, 32)
    assert "labels" not in step.input_names and contract(bundle.config, "jacobi", block=0).inputs[0].shape[1] == 17


CASES = [(v, b, r) for v in STARFLOW_PARITY_TESTED for b, r in ((1, False), (2, False), (2, True))]


@pytest.mark.parametrize("variant,batch,cfg_rows", CASES)
def test_variant_matches_pytorch(bundle, model, variant, batch, cfg_rows):
    blocks = [2] if variant == "prefix" else range(3)
    for block in blocks:
        c = contract(bundle.config, variant, UNROLL, block=block)
        s = ort.InferenceSession(str(bundle.graph_path(variant, block)), providers=["CPUExecutionProvider"])
        for seed in (batch, batch + 7):
            feeds = dummy_inputs(c, bundle.config, batch=batch, cfg_rows=cfg_rows, seed=seed)
            if cfg_rows and block == 2 and "temps" in feeds:
                assert feeds["temps"].shape[0] == 2 * batch  # the text block runs the guided rows
            got = dict(zip(c.output_names, s.run(None, feeds)))
            want = reference_outputs(model, block, c, feeds)
            assert set(got) == set(want)
            for name in c.output_names:
                assert got[name].shape == want[name].shape, name
                np.testing.assert_allclose(got[name], want[name], atol=c.atol, rtol=0,
                                           err_msg=f"block {block} {variant} {name}")


def _sample(model, noise, text, null, guidance, plan, runners=None, **kw):
    return sample(model, model.patchify(noise), plan=plan, text=text, uncond_text=null, guidance=guidance,
                  runners=runners, progress=False, **kw).images


@pytest.mark.parametrize("guidance", [0.0, 3.6])
@pytest.mark.parametrize("plan,kw", [("sequential", {}), ("sjd", {"tau": 1e-3}), ("starflow", {}),
                                     ("gs-jacobi", {"tau": 1e-3})])
def test_ort_cpu_sampling_equals_the_torch_path(built, model, plan, kw, guidance):
    from sejd.engines.ort import ort_runners

    noise, text, null = _data(CFG, seed=5)
    runners = ort_runners(built, "ort-cpu")
    assert all(r.single_token_path == "ONNX step_rows graph" for r in runners)  # no native/fused step for STARFlow
    got = _sample(model, noise, text, null, guidance, plan, runners, **kw)
    ref = _sample(model, noise, text, null, guidance, plan, **kw)
    assert (got - ref).abs().max().item() <= 1e-4
    if plan == "sequential":
        oracle = so.reverse_sample(so.random_state_dict(CFG, seed=0), CFG, noise,
                                   torch.cat([text, null]) if guidance else text, guidance)
        assert (got - oracle).abs().max().item() <= 1e-4


def test_native_and_fused_steps_refuse_starflow_blocks_saying_why(built, model):
    from sejd.engines import native, ort_fused_step
    from sejd.engines.ort import load_engine_manifest

    for block in model.blocks:
        for reason in (native.unsupported(block.spec), ort_fused_step.unsupported(block.spec)):
            assert "rope positions" in reason and "a start token" in reason and "softplus" in reason
    assert "a text prefix" in native.unsupported(model.blocks[2].spec)
    manifest = load_engine_manifest(built, "ort-cpu")
    assert not any(b["used"] for b in manifest["step_fused"]["blocks"].values())
    assert "native CPU step not used" in manifest["single_token_path"]


def test_sejd_check_passes_on_ort_cpu(built):
    from sejd.workflows.check import check_bundle

    report = check_bundle(built, "ort-cpu", show_progress=False)
    assert report, report.summary()
    names = [c.name for c in report.checks]
    assert "block 2 prefix" in names and "plan starflow: engine vs PyTorch, same plan" in names
    assert max(c.figures["max_abs"] for c in report.checks if "same plan" in c.name) <= 1e-4


def test_sejd_check_cli_exit_0(built):
    from sejd.cli import main

    assert main(["check", str(built.path), "--backend", "ort-cpu", "--quick", "--no-progress"]) == 0


def test_wrong_text_into_the_runner_is_refused_naming_expected_and_got(built):
    from sejd.engines.ort import ort_runners

    runner = ort_runners(built, "ort-cpu")[2]
    for bad in (torch.zeros(2, 4, 10), torch.zeros(2, 3, 12), None):
        cond = Conditioning(torch.full((2,), -1), torch.ones(2), None, bad)
        with pytest.raises(InputError, match=r"\(2, 4, 12\).*got " + (r"\(2, " if bad is not None else "None")):
            runner.begin(2, cond)
    runner.begin(2, Conditioning(torch.full((2,), -1), torch.ones(2), None, torch.zeros(2, 4, 12)))
    with pytest.raises(InputError, match=r"\(2, 17, 4\).*got \(2, 16, 4\)"):  # runtime tokens: T + 1 (start token)
        runner.check_input(torch.zeros(2, 16, 4), 2)


def test_variants_not_exported_for_starflow_are_refused_in_one_line(model, tmp_path):
    for variant in ("forward", "jacobi_loop", "sequential_loop"):
        with pytest.raises(SejdError) as e:
            export_bundle(model, tmp_path / variant, variants=[variant], show_progress=False)
        assert "\n" not in str(e.value) and f"'{variant}'" in str(e.value) and "STARFlow" in str(e.value)
    with pytest.raises(InputError, match="not exported for STARFlow"):
        contract(model.config, "jacobi_loop", block=0)
    with pytest.raises(InputError, match="only for a STARFlow block with text"):
        contract(model.config, "prefix", block=0)
    assert not (tmp_path / "forward").exists()


def test_default_export_and_re_export_from_the_bundles_model_folder(bundle, tmp_path):
    again = export_bundle(bundle.path / "model", tmp_path / "again", show_progress=False)
    assert again.variants() == sorted(["prefix", "step_rows", "window", "jacobi"])
    assert again.manifest["family"] == "starflow" and again.config == bundle.config
    # a TarFlow manifest may not be turned into a STARFlow one by hand (family is validated)
    m = json.loads((again.path / "manifest.json").read_text())
    m["family"] = "other"
    (again.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SejdError, match="family"):
        load_bundle(again.path)
