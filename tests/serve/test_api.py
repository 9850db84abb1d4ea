"""The HTTP app in-process (no Ray): validation, error bodies, body limits, metrics, OpenAPI."""

import base64
import io

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from sejd.serve.api import create_api
from sejd.serve.read_limits import MAX_BODY_BYTES
from sejd.serve.service import Sampled, SampleService
from sejd.workflows.source import open_source
from tests.serve.asgi import call
from tests.serve.conftest import engine_fails_on_plan


@pytest.fixture(scope="module")
def service(tuned_bundle):
    return SampleService(open_source(tuned_bundle, "ort-cpu"))


@pytest.fixture(scope="module")
def app(service):
    return create_api(service, "tiny")


def test_sample_answers_images_and_statistics(app):
    r = call(app, "POST", "/sample", {"n": 2, "seed": 4, "plan": "sjd"})
    assert r.status == 200
    body = r.json()
    images = np.frombuffer(base64.b64decode(body["data"]), np.float32).reshape(body["shape"])
    assert images.shape == (2, 3, 8, 8) and body["batch_size"] == 2 and len(body["blocks"]) == 4


def test_formats(app):
    png = call(app, "POST", "/sample", {"n": 2, "seed": 3, "plan": "sequential", "format": "png"}).json()
    assert base64.b64decode(png["png"])[:8] == b"\x89PNG\r\n\x1a\n"
    npy = call(app, "POST", "/sample", {"n": 1, "seed": 3, "plan": "sequential", "format": "npy"}).json()
    assert np.load(io.BytesIO(base64.b64decode(npy["npy"]))).shape == (1, 3, 8, 8)


def test_a_form_encoded_or_empty_body_is_read_as_json(app):
    # `curl -d '{...}'` labels its data application/x-www-form-urlencoded
    r = call(app, "POST", "/sample", b'{"n": 1, "seed": 2, "plan": "sjd"}',
             headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status == 200 and r.json()["n"] == 1
    r = call(app, "POST", "/sample", b"")
    assert r.status == 200 and r.json()["plan"] == "auto"  # every field defaulted: the tuned plan


@pytest.mark.parametrize("body,status,field", [
    ({"n": 0}, 400, "n"), (b"{not json", 400, "body"), (b"[1, 2]", 400, "body"), ({"plan": "warp"}, 400, "plan"),
    ({"guidance": 1e6}, 400, "guidance"), ({"guidance": 1e308}, 400, "guidance"), ({"colour": 1}, 400, "colour"),
    ({"plan": "auto", "guidance": 3.0}, 400, "guidance"), (b"NaN", 400, "body"),
])
def test_every_4xx_names_the_field(app, body, status, field):
    r = call(app, "POST", "/sample", body)
    assert (r.status, r.json()["field"]) == (status, field) and r.json()["error"].startswith(field)


def test_404_and_405_have_the_same_shape(app):
    r = call(app, "GET", "/nope")
    assert r.status == 404 and r.json() == {"error": "path: no route GET /nope", "field": "path"}
    r = call(app, "GET", "/sample")
    assert r.status == 405 and r.json()["field"] == "method"


def test_a_body_over_the_limit_is_refused_on_its_content_length_before_reading(app):
    r = call(app, "POST", "/sample", [b"x" * 1000], headers={"content-length": str(300 * 2**20)})
    assert r.status == 413 and r.json()["field"] == "body" and "Content-Length" in r.json()["error"]
    assert r.received == 0  # not one byte read


def test_a_chunked_body_is_read_only_up_to_the_limit(app):
    chunk = b" " * 4096
    r = call(app, "POST", "/sample", [chunk] * 1000)  # 4 MB, no Content-Length
    assert r.status == 413 and r.json()["field"] == "body"
    assert MAX_BODY_BYTES < r.received <= MAX_BODY_BYTES + len(chunk)  # stopped at the first chunk past it
    r = call(app, "POST", "/sample", [b'{"n": 1, ', b'"seed": 2, "plan": "sjd"}'])  # chunked and small: fine
    assert r.status == 200


def test_routes_work_under_a_route_prefix(app):
    r = call(app, "GET", "/healthz", root_path="/team/sejd")  # as Ray Serve calls an app at route_prefix
    assert r.status == 200 and r.json()["status"] == "ok"
    assert call(app, "POST", "/sample", {"n": 1, "plan": "sjd"}, root_path="/team/sejd").status == 200


def test_docs_and_openapi_schema(app):
    assert call(app, "GET", "/docs").status == 200
    spec = call(app, "GET", "/openapi.json").json()
    body = spec["components"]["schemas"]["SampleBody"]
    assert body["additionalProperties"] is False
    assert body["properties"]["guidance"]["maximum"] == 100
    plans = body["properties"]["plan"]
    assert set(plans["enum"]) == {"sequential", "ujd", "sjd", "gs-jacobi", "auto"}


def test_an_engine_failure_is_a_500_and_the_service_keeps_serving(service, app, monkeypatch):
    engine_fails_on_plan(monkeypatch, service.plans[("ujd", None)])
    r = call(app, "POST", "/sample", {"n": 1, "plan": "ujd"})
    assert r.status == 500 and r.json()["field"] == "engine" and "sampling failed" in r.json()["error"]
    assert call(app, "POST", "/sample", {"n": 1, "plan": "sequential"}).status == 200


def test_a_request_past_its_deadline_gets_504(service):
    hasty = create_api(service, "tiny", deadline_s=1e-4)
    r = call(hasty, "POST", "/sample", {"n": 8, "seed": 1, "plan": "sequential"})
    assert r.status == 504 and r.json()["field"] == "deadline"
    families = {f.name: f for f in text_string_to_metric_families(call(hasty, "GET", "/metrics").body.decode())}
    assert {s.labels["status"]: s.value for s in families["sejd_requests"].samples
            if s.name == "sejd_requests_total"} == {"504": 1.0}


def test_metrics_in_prometheus_text_format(service):
    app = create_api(service, "tiny")  # its own registry: counts start at zero
    for body in ({"n": 2, "seed": 1, "plan": "sjd"}, {"n": 1, "seed": 2, "plan": "sequential"}, {"n": 0}):
        call(app, "POST", "/sample", body)
    call(app, "GET", "/nope")
    call(app, "GET", "/sample")
    call(app, "POST", "/sample", b"x" * (MAX_BODY_BYTES + 1))
    r = call(app, "GET", "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.body.decode())}
    by_status = {s.labels["status"]: s.value for s in families["sejd_requests"].samples
                 if s.name == "sejd_requests_total"}
    assert by_status == {"200": 2.0, "400": 1.0, "404": 1.0, "405": 1.0, "413": 1.0}
    latency = {s.name: s.value for s in families["sejd_request_latency_seconds"].samples if not s.labels.get("le")}
    assert latency["sejd_request_latency_seconds_count"] == 6.0
    batch = {s.name: s.value for s in families["sejd_engine_batch_samples"].samples if not s.labels.get("le")}
    assert batch["sejd_engine_batch_samples_count"] == 2.0 and batch["sejd_engine_batch_samples_sum"] == 3.0
    blocks = {s.labels["block"] for s in families["sejd_block_iterations"].samples}
    assert blocks == {"0", "1", "2", "3"}
    view = call(app, "GET", "/metrics.json").json()
    assert view["requests"] == 7 and view["status"]["404"] == 1 and view["latency_seconds"]["p50"] is not None
    assert view["batch_size"]["batches"] == 2 and set(view["iterations_per_block"]) == {"0", "1", "2", "3"}


def hostile_bodies(count, seed=0):
    """Generated request bodies: wrong types, out-of-range and absurd values, unknown fields, bad JSON."""
    import json
    import random
    rng = random.Random(seed)
    values = [None, True, -1, 0, 1, 3, 65, 2**63, 10**30, -10**30, 1e308, -0.0, 0.5, "4", "", "auto", [], {},
              [1, 2], {"n": 1}, "x" * 300, 100.5, 99.9]
    fields = ["n", "seed", "label", "guidance", "plan", "format", "colour", "N", ""]
    raw = [b"", b"{", b"[]", b"null", b"1", b'"n"', b"NaN", b"Infinity", b'{"n": NaN}', b'{"guidance": Infinity}',
           b'{"n": 1, "n": 2}', b"\xff\xfe", b'{"n": 1e999}', b"[" * 5000 + b"]" * 5000]
    for i in range(count):
        if i % 5 == 0:
            yield raw[i // 5 % len(raw)] if i // 5 < len(raw) else bytes(rng.randrange(256) for _ in range(20))
        else:
            body = {rng.choice(fields): rng.choice(values) for _ in range(rng.randrange(1, 4))}
            yield json.dumps(body).encode()


def test_two_hundred_hostile_bodies_end_in_a_4xx_or_an_answer_never_a_fault(service, monkeypatch):
    app = create_api(service, "tiny")
    # sampling is not what this test exercises: a request that validates is answered by a stand-in
    monkeypatch.setattr(service, "run_batch", lambda reqs: [Sampled(torch.zeros(r.n, 3, 8, 8), r.plan, r.n, 0.0, [])
                                                            for r in reqs])
    statuses = []
    for body in hostile_bodies(200):
        r = call(app, "POST", "/sample", body)
        statuses.append(r.status)
        assert r.status in (200, 400, 413), (body[:80], r.status, r.body[:200])
        if r.status != 200:
            answer = r.json()
            assert set(answer) == {"error", "field"} and answer["error"].startswith(answer["field"])
    assert statuses.count(400) > 100  # most of them are bad
