"""Lean tracing (sejd/export/lean.py): a STARFlow block too large to copy is traced with zero-stride placeholders
and its real tensors are written one at a time. Forced here on the tiny STARFlow of test_starflow_export (every
block lean): every graph against the PyTorch reference at the contract's atol (1e-4, float32), the block's own
parameters untouched afterwards, and a bf16 checkpoint exported from its memory-mapped file."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sejd.export import lean, onnx_export
from sejd.export.contracts import STARFLOW_VARIANTS, contract, dummy_inputs
from sejd.export.exporter import export_bundle
from sejd.export.oracle import reference_outputs
from tests.export.test_starflow_export import CFG, UNROLL, _model
from tests.model import starflow_oracle as so


def _assert_graphs_match(bundle, model, variants):
    for g in bundle.manifest["graphs"]:
        k, variant = g["block"], g["variant"]
        assert variant in variants
        c = contract(bundle.config, variant, UNROLL, block=k)
        s = ort.InferenceSession(str(bundle.graph_path(variant, k)), providers=["CPUExecutionProvider"])
        for batch, cfg_rows in ((1, False), (2, True)):
            feeds = dummy_inputs(c, bundle.config, batch=batch, cfg_rows=cfg_rows, seed=batch + 3)
            got = dict(zip(c.output_names, s.run(None, feeds)))
            want = reference_outputs(model, k, c, feeds)
            for name in c.output_names:
                np.testing.assert_allclose(got[name], want[name], atol=c.atol, rtol=0,
                                           err_msg=f"block {k} {variant} {name}")


@pytest.fixture
def every_block_lean(monkeypatch):
    monkeypatch.setattr(lean, "LEAN_BLOCK_BYTES", 0)


def test_lean_graphs_match_pytorch_and_never_hold_the_blocks_weights(every_block_lean, monkeypatch, tmp_path):
    model = _model()
    originals = {n: p for n, p in model.named_parameters()}
    traced = []
    to_onnx = onnx_export._to_onnx

    def watching(module, *args, **kwargs):
        params = [p for n, p in module.named_parameters() if n.startswith("block.")]
        # every block tensor the exporter sees owns one float: the block's weights are never copied
        traced.append(all(p.untyped_storage().nbytes() == 4 and set(p.stride()) <= {0} for p in params))
        return to_onnx(module, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "_to_onnx", watching)
    bundle = export_bundle(model, tmp_path / "b", variants=STARFLOW_VARIANTS, unroll=UNROLL, show_progress=False)
    assert traced and all(traced)
    assert bundle.manifest["weights"]["graphs_retargeted"] == 0  # a lean block is traced, never re-targeted
    assert all(p is originals[n] for n, p in model.named_parameters())  # the placeholders are gone again
    _assert_graphs_match(bundle, model, STARFLOW_VARIANTS)


@pytest.mark.parametrize("lean_blocks", [True, False])
def test_a_bf16_checkpoint_is_exported_from_its_mapped_file(lean_blocks, monkeypatch, tmp_path):
    """Apple ships bf16: the export reads it mapped, keeps it as it is in the bundle's model, and writes float32
    graphs equal to the model upcast (the reference), lean or not (small blocks are upcast whole)."""
    if lean_blocks:
        monkeypatch.setattr(lean, "LEAN_BLOCK_BYTES", 0)
    sd = {k: v.to(torch.bfloat16) for k, v in so.random_state_dict(CFG, seed=1).items()}
    torch.save(sd, tmp_path / "starflow.pth")
    bundle = export_bundle(tmp_path / "starflow.pth", tmp_path / "b", config=CFG, unroll=UNROLL, show_progress=False)
    from safetensors import safe_open

    with safe_open(str(bundle.path / "model" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if k != "var"} == {"BF16"}
    model = bundle.load_model()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for k, v in sd.items():
        if k in dict(model.named_parameters()):
            torch.testing.assert_close(dict(model.named_parameters())[k], v.float(), atol=0, rtol=0)
    _assert_graphs_match(bundle, model, STARFLOW_VARIANTS)
