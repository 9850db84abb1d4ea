import json

import numpy as np
import pytest
import torch

from sejd.cli import main
from sejd.core.errors import PlanError
from sejd.runtime.request import per_sample_plan, seeded_labels, seeded_noise
from sejd.runtime.sampler import sample
from sejd.serve.schema import RequestError, SampleRequest
from sejd.serve.service import Sampled, SampleService, SamplingFailed
from sejd.workflows.source import open_source
from tests.serve.conftest import AUTO_PLANS, engine_fails_on_plan, with_tuned_plans


@pytest.fixture(scope="module")
def service(tuned_bundle):
    return SampleService(open_source(tuned_bundle, "ort-cpu"))


@pytest.mark.parametrize("plan", ["sequential", "sjd", "ujd"])
def test_each_request_is_bit_identical_to_sejd_sample_with_its_seed(service, tuned_bundle, tmp_path, plan):
    reqs = [SampleRequest(n=2, seed=1, plan=plan), SampleRequest(n=1, seed=5, label=3, plan=plan),
            SampleRequest(n=3, seed=1, plan=plan)]
    results = service.run_batch(reqs)
    assert [r.batch_size for r in results] == [6, 6, 6]  # rode in one engine batch
    for req, res in zip(reqs, results):
        npy = tmp_path / f"{req.seed}_{req.n}.npy"
        args = ["sample", str(tuned_bundle), "-n", str(req.n), "--seed", str(req.seed), "--plan", plan,
                "--per-sample", "--npy", str(npy)]
        if req.label is not None:
            args += ["--label", str(req.label)]
        assert main(args) == 0
        assert np.array_equal(res.images.numpy(), np.load(npy))


@pytest.mark.parametrize("plan", ["gs-jacobi", "auto", "sjd"])
def test_a_served_request_is_the_seeded_request_of_sejd_request_bit_for_bit(service, plan):
    """The one definition of a seeded request: noise and labels from sejd.runtime.request, the plan made per-sample
    with per_sample_plan (GS-Jacobi blocks included), sampled alone."""
    reqs = [SampleRequest(n=4, seed=9, plan=plan), SampleRequest(n=1, seed=3, label=2, plan=plan),
            SampleRequest(n=2, seed=3, plan=plan)]
    results = service.run_batch(reqs)
    src, cfg = service.src, service.cfg
    for req, res in zip(reqs, results):
        own = per_sample_plan(src.plan(req.plan, req.n))
        alone = sample(src.model, seeded_noise(req.n, req.seed, cfg.num_tokens, cfg.token_dim),
                       labels=seeded_labels(req.n, req.label, cfg.num_classes), runners=src.runners, plan=own,
                       progress=False)
        assert torch.equal(res.images, alone.images), req


def test_auto_resolves_by_the_requests_own_n_and_gs_jacobi_is_served_per_sample(service):
    alone = service.run_batch([SampleRequest(n=1, seed=7, plan="auto")])[0]
    mixed = service.run_batch([SampleRequest(n=1, seed=7, plan="auto"), SampleRequest(n=4, seed=2, plan="auto")])
    assert torch.equal(alone.images, mixed[0].images)
    assert [b.decoder for b in mixed[0].blocks] == ["sequential"] * 4
    assert [b.decoder for b in mixed[1].blocks] == ["jacobi"] * 4  # the GS-Jacobi block, per sample
    gs_alone = service.run_batch([SampleRequest(n=1, seed=3, plan="gs-jacobi")])[0]
    gs_mixed = service.run_batch([SampleRequest(n=2, seed=9, plan="gs-jacobi"),
                                  SampleRequest(n=1, seed=3, plan="gs-jacobi")])[1]
    assert torch.equal(gs_alone.images, gs_mixed.images)


def test_different_plans_or_guidance_ride_in_separate_batches(service):
    reqs = [SampleRequest(n=1, seed=0, plan="sjd"), SampleRequest(n=1, seed=0, plan="sequential"),
            SampleRequest(n=2, seed=0, plan="sjd", guidance=1.0)]
    results = service.run_batch(reqs)
    assert all(isinstance(r, Sampled) for r in results)
    assert [r.batch_size for r in results] == [1, 1, 2]
    assert not torch.equal(results[0].images, results[2].images[:1])  # guidance changed the sample


@pytest.mark.parametrize("body,field", [
    ([1, 2], "body"), ({"n": 0}, "n"), ({"n": 1000}, "n"), ({"n": "4"}, "n"), ({"n": True}, "n"),
    ({"seed": -1}, "seed"), ({"seed": 10**23}, "seed"), ({"label": 99}, "label"),
    ({"guidance": float("nan")}, "guidance"), ({"guidance": 1e6}, "guidance"), ({"guidance": 1e308}, "guidance"),
    ({"guidance": 10**400}, "guidance"), ({"guidance": -1}, "guidance"), ({"plan": "fast"}, "plan"),
    ({"plan": "reference"}, "plan"), ({"format": "gif"}, "format"), ({"colour": 1}, "colour"),
])
def test_bad_requests_name_the_field(service, body, field):
    with pytest.raises(RequestError) as e:
        service.parse(body)
    assert e.value.field == field and e.value.status == 400 and str(e.value).startswith(field + ":")


def test_guidance_errors_say_the_bound(service):
    with pytest.raises(RequestError, match=r"finite number in 0\.\.100"):
        service.parse({"guidance": 1e6})


def test_auto_is_served_only_at_the_guidance_it_was_tuned_at(service):
    assert service.parse({"plan": "auto", "guidance": 0}).plan == "auto"
    with pytest.raises(RequestError) as e:
        service.parse({"plan": "auto", "guidance": 2.5})
    assert e.value.field == "guidance" and "tuned at guidance 0" in str(e.value) and "2.5" in str(e.value)
    assert service.parse({"plan": "sjd", "guidance": 2.5}).guidance == 2.5  # named plans take any guidance


def test_the_default_plan_is_the_tuned_one(service, tiny_bundle):
    assert service.parse({}).plan == "auto"
    assert SampleService(open_source(tiny_bundle.path, "ort-cpu")).parse({}).plan == "sjd"


@pytest.mark.parametrize("broken,message", [
    ({"blocks": [{"decoder": "jacobi", "tau": -1}] * 4}, "tau must be a number >= 0"),
    ({"blocks": [{"decoder": "sequential"}] * 4, "meta": {"guidance": "lots"}}, "meta.guidance"),
    ("{broken", "not valid JSON"),
])
def test_an_invalid_tuned_plan_stops_the_service_from_starting_naming_the_file(tiny_bundle, tmp_path, broken,
                                                                                message):
    bundle = with_tuned_plans(tiny_bundle.path, tmp_path / "b", {1: AUTO_PLANS[1]})
    (bundle / "plans" / "batch-2.json").write_text(broken if isinstance(broken, str) else json.dumps(broken))
    with pytest.raises(PlanError) as e:
        SampleService(open_source(bundle, "ort-cpu"))
    assert "batch-2.json" in str(e.value) and message in str(e.value)


def test_groups_larger_than_batch_max_are_split_and_results_unchanged(service):
    service.batch_max = 3  # pretend the bundle serves at most 3 samples per engine call
    try:
        reqs = [SampleRequest(n=2, seed=1, plan="sjd"), SampleRequest(n=2, seed=2, plan="sjd"),
                SampleRequest(n=1, seed=3, plan="sjd")]
        results = service.run_batch(reqs)
        assert [r.batch_size for r in results] == [2, 3, 3]
        alone = service.run_batch([SampleRequest(n=2, seed=2, plan="sjd")])[0]
        assert torch.equal(results[1].images, alone.images)
    finally:
        service.batch_max = 64


def test_a_failing_engine_batch_fails_only_its_own_requests(service, monkeypatch):
    engine_fails_on_plan(monkeypatch, service.plans[("ujd", None)])
    results = service.run_batch([SampleRequest(n=1, seed=1, plan="ujd"), SampleRequest(n=1, seed=1, plan="sjd")])
    assert isinstance(results[0], SamplingFailed) and "sampling failed" in str(results[0])
    assert isinstance(results[1], Sampled)
