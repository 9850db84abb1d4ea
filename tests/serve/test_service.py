import base64

import numpy as np
import pytest
import torch

from sejd.cli import main
from sejd.serve.service import RequestError, SampleRequest, SampleService, parse_request
from sejd.source import open_source


@pytest.fixture(scope="module")
def service(tiny_bundle):
    return SampleService(open_source(tiny_bundle.path, "ort-cpu"))


def decode(result):
    return np.frombuffer(base64.b64decode(result["data"]), np.float32).reshape(result["shape"])


@pytest.mark.parametrize("plan", ["sequential", "sjd", "ujd"])
def test_each_request_is_bit_identical_to_sejd_sample_with_its_seed(service, tiny_bundle, tmp_path, plan):
    reqs = [SampleRequest(n=2, seed=1, plan=plan), SampleRequest(n=1, seed=5, label=3, plan=plan),
            SampleRequest(n=3, seed=1, plan=plan)]
    results = service.run_batch(reqs)
    assert [r["batch_size"] for r in results] == [6, 6, 6]  # rode in one engine batch
    for req, res in zip(reqs, results):
        npy = tmp_path / f"{req.seed}_{req.n}.npy"
        args = ["sample", str(tiny_bundle.path), "-n", str(req.n), "--seed", str(req.seed), "--plan", plan,
                "--per-sample", "--npy", str(npy)]
        if req.label is not None:
            args += ["--label", str(req.label)]
        assert main(args) == 0
        assert np.array_equal(decode(res), np.load(npy))


def test_different_plans_or_guidance_ride_in_separate_batches(service):
    reqs = [SampleRequest(n=1, seed=0, plan="sjd"), SampleRequest(n=1, seed=0, plan="sequential"),
            SampleRequest(n=2, seed=0, plan="sjd", guidance=1.0)]
    results = service.run_batch(reqs)
    assert [r["batch_size"] for r in results] == [1, 1, 2]
    assert not np.array_equal(decode(results[0]), decode(results[2])[:1])  # guidance changed the sample


@pytest.mark.parametrize("body,field", [
    ([1, 2], "body"), ({"n": 0}, "n"), ({"n": 1000}, "n"), ({"n": "4"}, "n"), ({"seed": -1}, "seed"),
    ({"label": 99}, "label"), ({"guidance": float("nan")}, "guidance"), ({"plan": "fast"}, "plan"),
    ({"format": "gif"}, "format"), ({"colour": 1}, "colour"),
])
def test_bad_requests_name_the_field(service, body, field):
    with pytest.raises(RequestError) as e:
        service.parse(body)
    assert e.value.field == field and e.value.status == 400 and field in str(e.value)


def test_formats_and_metrics(service):
    req = parse_request({"n": 2, "seed": 3, "format": "png"}, 5, ("sjd",))
    png = service.run_batch([SampleRequest(**{**req.__dict__, "plan": "sequential"})])[0]
    assert base64.b64decode(png["png"])[:8] == b"\x89PNG\r\n\x1a\n"
    npy = service.run_batch([SampleRequest(n=1, seed=3, plan="sequential", format="npy")])[0]
    import io
    assert np.load(io.BytesIO(base64.b64decode(npy["npy"]))).shape == (1, 3, 8, 8)
    m = service.metrics.to_dict()
    assert m["batch_size"]["batches"] >= 2 and set(m["iterations_per_block"]) == {"0", "1", "2", "3"}
