"""The Triton model repository: config parsed with Triton's own protobuf schema, and the Python
backend's `execute` run against stub request objects."""

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from sejd.cli import main
from sejd.runtime.request import per_sample_plan, seeded_labels, seeded_noise
from sejd.runtime.sampler import sample
from sejd.serve.triton import export_triton
from tests.serve.conftest import engine_fails_on_plan


class StubTensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


def stub_pb_utils():
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor = StubTensor
    m.TritonError = type("TritonError", (Exception,), {})

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.output_tensors, self.error = list(output_tensors), error
    m.InferenceResponse = InferenceResponse
    m.get_input_tensor_by_name = lambda request, name: request.get(name)
    return m


@pytest.fixture(scope="module")
def repo(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton")
    model_dir = export_triton(tiny_bundle.path, out, name="tiny", plan="sjd", max_batch=8)
    return out, model_dir


def test_config_parses_with_tritons_schema(repo):
    _, model_dir = repo
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.name == "tiny" and config.backend == "python" and config.max_batch_size == 8
    assert [i.name for i in config.input] == ["SEED", "LABEL", "GUIDANCE"]
    assert list(config.output[0].dims) == [3, 8, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 10000
    assert config.parameters["sejd_plan"].string_value == "sjd"
    assert (model_dir / "1" / "bundle" / "manifest.json").exists()


@pytest.fixture
def triton_model(monkeypatch):
    """sejd.serve.triton_model imported fresh against a stub of Triton's backend utilities."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub_pb_utils())
    monkeypatch.delitem(sys.modules, "sejd.serve.triton_model", raising=False)
    yield
    sys.modules.pop("sejd.serve.triton_model", None)


def load_model(model_dir):
    """The repository's model.py, initialised as Triton's Python backend does."""
    spec = importlib.util.spec_from_file_location("tiny_model", model_dir / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
                      "model_repository": str(model_dir), "model_version": "1"})
    return model


def test_model_py_only_imports_the_packaged_model(repo, triton_model):
    _, model_dir = repo
    from sejd.serve.triton_model import TritonPythonModel
    assert "from sejd.serve.triton_model import TritonPythonModel" in (model_dir / "1" / "model.py").read_text()
    assert type(load_model(model_dir)) is TritonPythonModel


def test_python_backend_execute_matches_sejd_sample(repo, tmp_path, triton_model):
    out, model_dir = repo
    model = load_model(model_dir)
    requests = [{"SEED": StubTensor("SEED", [[3], [4]]), "LABEL": StubTensor("LABEL", [[1], [-1]])},
                {"SEED": StubTensor("SEED", [[5]])},
                {"SEED": StubTensor("SEED", [[6]]), "LABEL": StubTensor("LABEL", [[99]])},  # bad label
                {"SEED": StubTensor("SEED", [[7]]), "GUIDANCE": StubTensor("GUIDANCE", [[1e6]])}]  # absurd guidance
    responses = model.execute(requests)
    assert responses[2].error is not None and str(responses[2].error).startswith("label:")
    assert responses[3].error is not None and "0..100" in str(responses[3].error)
    got = {3: responses[0].output_tensors[0].as_numpy()[0], 4: responses[0].output_tensors[0].as_numpy()[1],
           5: responses[1].output_tensors[0].as_numpy()[0]}
    for seed, label in ((3, "1"), (4, "-1"), (5, None)):
        npy = tmp_path / f"{seed}.npy"
        args = ["sample", str(model_dir / "1" / "bundle"), "-n", "1", "--seed", str(seed), "--plan", "sjd",
                "--per-sample", "--npy", str(npy)]
        if label is not None:
            args += ["--label", label]
        assert main(args) == 0
        assert np.array_equal(got[seed], np.load(npy)[0])


def test_auto_rows_equal_the_seeded_request_and_refuse_other_guidance(tuned_bundle, tmp_path, triton_model):
    model_dir = export_triton(tuned_bundle, tmp_path, name="auto", max_batch=8)  # the tuned plan by default
    model = load_model(model_dir)
    responses = model.execute([{"SEED": StubTensor("SEED", [[3], [8]])},
                               {"SEED": StubTensor("SEED", [[1]]), "GUIDANCE": StubTensor("GUIDANCE", [[2.0]])}])
    assert "tuned at guidance 0" in str(responses[1].error)
    src = model.service.src
    for row, seed in enumerate((3, 8)):
        cfg = src.model.config
        alone = sample(src.model, seeded_noise(1, seed, cfg.num_tokens, cfg.token_dim),
                       labels=seeded_labels(1, None, cfg.num_classes), runners=src.runners,
                       plan=per_sample_plan(src.plan("auto", 1)), progress=False)
        assert np.array_equal(responses[0].output_tensors[0].as_numpy()[row], alone.images[0].numpy())


def test_a_failing_engine_batch_fails_its_requests(repo, triton_model, monkeypatch):
    _, model_dir = repo
    model = load_model(model_dir)
    engine_fails_on_plan(monkeypatch, model.service.plans[("sjd", None)])
    responses = model.execute([{"SEED": StubTensor("SEED", [[3]])}])
    assert "sampling failed" in str(responses[0].error)


def test_export_triton_cli_refuses_overwrite_and_oversized_batches(repo, tiny_bundle, capsys):
    out, _ = repo
    assert main(["export-triton", str(tiny_bundle.path), "-o", str(out), "--name", "tiny"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["export-triton", str(tiny_bundle.path), "-o", str(out), "--name", "big", "--max-batch", "999"]) == 2
    assert "max_batch must be 1..64" in capsys.readouterr().err


def test_export_triton_refuses_a_plan_the_service_cannot_serve(tiny_bundle, tmp_path):
    from sejd.core.errors import SejdError
    with pytest.raises(SejdError, match="--plan must be one of"):
        export_triton(tiny_bundle.path, tmp_path, name="x", plan="/tmp/myplan.json")
