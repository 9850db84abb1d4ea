import base64

import numpy as np
import pytest

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


def test_auto_resolves_by_the_requests_own_n_and_gs_jacobi_is_served_per_sample(tiny_bundle, tmp_path):
    import json
    import shutil
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle.path, bundle)
    (bundle / "plans").mkdir(exist_ok=True)
    (bundle / "plans" / "batch-1.json").write_text(json.dumps({"blocks": [{"decoder": "sequential"}] * 4}))
    (bundle / "plans" / "batch-4.json").write_text(json.dumps({"blocks": [{"decoder": "jacobi", "tau": 0.01}] * 4}))
    service = SampleService(open_source(bundle, "ort-cpu"))
    alone = service.run_batch([SampleRequest(n=1, seed=7, plan="auto")])[0]
    mixed = service.run_batch([SampleRequest(n=1, seed=7, plan="auto"), SampleRequest(n=4, seed=2, plan="auto")])
    assert np.array_equal(decode(alone), decode(mixed[0]))
    assert [b["decoder"] for b in mixed[0]["blocks"]] == ["sequential"] * 4
    assert [b["decoder"] for b in mixed[1]["blocks"]] == ["jacobi"] * 4
    gs_alone = service.run_batch([SampleRequest(n=1, seed=3, plan="gs-jacobi")])[0]
    gs_mixed = service.run_batch([SampleRequest(n=2, seed=9, plan="gs-jacobi"),
                                  SampleRequest(n=1, seed=3, plan="gs-jacobi")])[1]
    assert np.array_equal(decode(gs_alone), decode(gs_mixed))


def test_groups_larger_than_batch_max_are_split_and_results_unchanged(service):
    service.batch_max = 3  # pretend the bundle serves at most 3 samples per engine call
    try:
        reqs = [SampleRequest(n=2, seed=1, plan="sjd"), SampleRequest(n=2, seed=2, plan="sjd"),
                SampleRequest(n=1, seed=3, plan="sjd")]
        results = service.run_batch(reqs)
        assert [r["batch_size"] for r in results] == [2, 3, 3]
        alone = service.run_batch([SampleRequest(n=2, seed=2, plan="sjd")])[0]
        assert np.array_equal(decode(results[1]), decode(alone))
    finally:
        service.batch_max = 64


def test_huge_guidance_is_a_request_error(service):
    with pytest.raises(RequestError) as e:
        service.parse({"guidance": 10**400})
    assert e.value.field == "guidance"
