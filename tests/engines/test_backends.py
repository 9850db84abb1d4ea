"""One Backend object per engine kind: the registry, spec parsing, what each says it needs, the
runners, precisions, manifest pinning and `sejd check` hooks they give, and the engine modules'
imports (no engines -> check cycle, no ort -> tensorrt coupling)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import sejd
from sejd.core.errors import BackendUnavailable, SejdError
from sejd.engines import backends
from sejd.engines.backends import backend, registry
from sejd.export.contracts import BLOCK_VARIANTS

ENGINES = Path(sejd.__file__).parent / "engines"
NO_CUDA = backends.cuda_device_reason()


def test_every_backend_kind_has_one_object_in_the_registry():
    assert tuple(registry()) == ("torch", "ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "torch-cuda")
    assert all(b.name == name for name, b in registry().items())
    assert [n for n, b in registry().items() if b.needs_build] == ["ort-cpu", "ort-cuda", "ort-trt", "tensorrt"]
    assert [n for n, b in registry().items() if b.reference] == ["torch"]


@pytest.mark.parametrize("spec, name, precision", [("torch", "torch", "fp32"), ("ort-trt", "ort-trt", "fp32"),
                                                   ("torch-cuda", "torch-cuda", "fp32"),
                                                   ("torch-cuda:bf16", "torch-cuda", "bf16")])
def test_a_spec_names_its_backend_object_and_precision(spec, name, precision):
    found, got = backend(spec)
    assert found is registry()[name] and got == precision


@pytest.mark.parametrize("spec, message", [("metal", "unknown backend 'metal'"), ("ort-cpu:fp16", "only torch-cuda"),
                                           ("tensorrt:fp16", "only torch-cuda"), ("torch:bf16", "runs in fp32"),
                                           ("torch-cuda:", "empty precision"), ("torch-cuda:fp8", "unknown precision 'fp8'")])
def test_bad_specs_are_refused_naming_what_is_expected(spec, message):
    with pytest.raises(SejdError, match=message):
        backend(spec)


def test_callers_hold_backend_objects_not_wrappers_over_spec_strings():
    import sejd.engines

    gone = {"split_backend", "require", "runners_for", "build_engines", "engine_precision", "BACKENDS",
            "ENGINE_BACKENDS"}
    assert not gone & set(vars(sejd.engines))


def test_sejd_build_hands_its_options_to_the_backend_object(tiny_bundle, monkeypatch, capsys):
    from sejd.cli import main

    calls = []
    monkeypatch.setattr(registry()["ort-cpu"], "build", lambda bundle, **kw: calls.append(kw) or bundle.path / "e")
    assert main(["build", str(tiny_bundle.path), "--backend", "ort-cpu", "--precision", "fp16", "--threads", "2"]) == 0
    assert calls == [{"precision": "fp16", "threads": 2, "workspace": None, "strip_weights": False}]
    assert f"built ort-cpu engines in {tiny_bundle.path / 'e'}" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["torch", "torch-cuda"])
def test_the_pytorch_backends_need_no_build(tiny_bundle, name):
    with pytest.raises(SejdError, match=f"backend '{name}' needs no build step"):
        registry()[name].build(tiny_bundle)


@pytest.mark.skipif(NO_CUDA is None, reason="a CUDA device is visible here")
@pytest.mark.parametrize("name", ["torch-cuda", "tensorrt"])
def test_gpu_backends_refuse_before_touching_the_gpu_stack(tiny_bundle, name):
    found = registry()[name]
    assert found.available() == NO_CUDA  # the CUDA check comes first, before TensorRT is imported
    with pytest.raises(BackendUnavailable, match=f"backend {name} not available: no CUDA device"):
        found.runners(tiny_bundle)
    code = ("import sys; from sejd.engines.backends import registry; registry()['tensorrt'].available(); "
            "print('tensorrt' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_torch_runners_and_engine_runners_come_from_their_objects(tiny_bundle):
    from sejd.engines.ort import OrtBlockRunner
    from sejd.runtime.torch_runner import TorchBlockRunner

    assert all(isinstance(r, TorchBlockRunner) for r in registry()["torch"].runners(tiny_bundle.load_model()))
    runners = registry()["ort-cpu"].runners(tiny_bundle, threads=1)
    assert len(runners) == tiny_bundle.config.num_blocks and all(isinstance(r, OrtBlockRunner) for r in runners)


def test_precision_is_the_builds_for_engines_and_the_suffix_for_torch_cuda(tiny_bundle, tmp_path):
    assert registry()["ort-cpu"].precision(tiny_bundle, "fp32") == "fp32"  # as recorded by the build
    assert registry()["ort-cuda"].precision(tiny_bundle, "fp32") == "fp32"  # nothing built: fp32
    assert registry()["torch-cuda"].precision(None, "bf16") == "bf16"


def test_built_engines_are_pinned_to_their_runtime():
    import onnxruntime

    ort_cpu = registry()["ort-cpu"]
    assert ort_cpu.check_manifest({"onnxruntime": onnxruntime.__version__}) is None
    assert ort_cpu.check_manifest({"onnxruntime": "1.0.0"}) == \
        f"engines were built with onnxruntime 1.0.0, this is {onnxruntime.__version__}"
    assert registry()["torch"].check_manifest({}) is None


def test_check_hooks_say_which_graphs_and_how_polygraphy_reruns_them(tiny_bundle):
    graphs = tiny_bundle.manifest["graphs"]
    g = next(g for g in graphs if g["variant"] == "jacobi")
    assert registry()["ort-cpu"].checked_graphs(tiny_bundle, tiny_bundle.config) == (graphs, graphs)
    assert registry()["ort-trt"].polygraphy_args(tiny_bundle, g) == [
        str(tiny_bundle.path / "engines" / "ort-trt" / g["file"]), "--onnxrt", "--providers", "tensorrt", "cuda"]
    assert registry()["tensorrt"].polygraphy_args(tiny_bundle, g) == [str(tiny_bundle.path / g["file"]), "--trt"]
    assert registry()["torch-cuda"].polygraphy_args(tiny_bundle, g) == [str(tiny_bundle.path / g["file"]), "--onnxrt"]
    every, runnable = registry()["torch-cuda"].checked_graphs(None, tiny_bundle.config)
    assert len(every) == tiny_bundle.config.num_blocks * len(BLOCK_VARIANTS)
    assert {g["variant"] for g in runnable} == {"step_present", "step_rows", "window", "jacobi", "jacobi_k"}
    with pytest.raises(SejdError, match="PyTorch reference itself"):
        registry()["torch"].polygraphy_runner(tiny_bundle)


def test_opening_a_bundle_on_the_reference_loads_its_model_once(tiny_bundle, monkeypatch):
    from sejd.export.bundle import Bundle
    from sejd.workflows.source import open_source

    loads = []
    real = Bundle.load_model
    monkeypatch.setattr(Bundle, "load_model", lambda self: loads.append(1) or real(self))
    src = open_source(tiny_bundle.path, "torch")
    assert src.runners is None and src.backend == "torch" and len(loads) == 1


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside functions."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_engines_never_import_check_and_ort_never_imports_tensorrt():
    for path in ENGINES.glob("*.py"):
        assert "sejd.workflows.check" not in imported_modules(path), path.name
    assert "sejd.engines.tensorrt" not in imported_modules(ENGINES / "ort.py")


@pytest.mark.skipif(NO_CUDA is None, reason="a CUDA device is visible here")
def test_checking_tensorrt_engines_without_a_gpu_is_refused_before_tensorrt_is_asked(tiny_bundle):
    from sejd.workflows.check import check_graphs

    found = registry()["tensorrt"]
    for call in (lambda: found.check_manifest({}), lambda: found.polygraphy_runner(tiny_bundle),
                 lambda: check_graphs(tiny_bundle, "tensorrt", tiny_bundle.load_model(), show_progress=False)):
        with pytest.raises(BackendUnavailable, match="backend tensorrt not available: no CUDA device"):
            call()
