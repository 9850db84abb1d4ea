"""A real local Ray Serve instance on loopback, serving the tiny bundle on ONNX Runtime."""

import base64
import concurrent.futures
import json
import shutil
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest
import ray  # a test dependency (pyproject `test` extra)

from sejd.cli import main


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port, path, body=None, method=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method or
                                 ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    from ray import serve

    from sejd.serve.app import build_app
    bundle = tmp_path_factory.mktemp("serve") / "bundle"
    shutil.copytree(tiny_bundle.path, bundle)
    plans = bundle / "plans"
    plans.mkdir(exist_ok=True)
    (plans / "batch-1.json").write_text(json.dumps({"name": "auto", "blocks": [{"decoder": "sequential"}] * 4}))
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(str(bundle), "ort-cpu", max_batch=8, batch_wait_ms=100, deadline_s=30), route_prefix="/")
    yield port, bundle
    serve.shutdown()
    ray.shutdown()


def decode(result):
    return np.frombuffer(base64.b64decode(result["data"]), np.float32).reshape(result["shape"])


def test_concurrent_requests_are_batched_and_each_gets_its_seeded_result(server, tmp_path):
    port, bundle = server
    bodies = [{"n": 1 + i % 3, "seed": i, "plan": "sjd"} for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: call(port, "/sample", b), bodies))
    assert all(status == 200 for status, _ in results)
    assert max(r["batch_size"] for _, r in results) > 3  # some requests shared an engine batch
    for body, (_, res) in list(zip(bodies, results))[:4]:
        npy = tmp_path / f"{body['seed']}.npy"
        assert main(["sample", str(bundle), "-n", str(body["n"]), "--seed", str(body["seed"]), "--plan", "sjd",
                     "--per-sample", "--npy", str(npy)]) == 0
        assert np.array_equal(decode(res), np.load(npy))  # bit-identical, whatever batch it rode in


def test_bad_requests_get_4xx_naming_the_field(server):
    port, _ = server
    assert call(port, "/sample", {"n": 0})[0] == 400 and call(port, "/sample", {"n": 0})[1]["field"] == "n"
    assert call(port, "/sample", b"{not json")[1]["field"] == "body"
    assert call(port, "/sample", {"plan": "warp"})[1]["field"] == "plan"
    assert call(port, "/sample", b"x" * 70000)[0] == 413
    assert call(port, "/nope")[0] == 404
    assert call(port, "/sample")[0] == 405


def test_an_engine_failure_is_a_500_and_the_replica_keeps_serving(server):
    port, bundle = server
    (bundle / "plans" / "batch-2.json").write_text("{broken")  # read at first use of batch size 2
    status, body = call(port, "/sample", {"n": 2, "seed": 1, "plan": "auto"})
    assert status == 500 and body["field"] == "engine" and "not valid JSON" in body["error"]
    status, body = call(port, "/sample", {"n": 1, "seed": 1, "plan": "sequential"})
    assert status == 200 and body["n"] == 1


def test_a_request_past_its_deadline_gets_504(server):
    from ray import serve

    from sejd.serve.app import build_app
    port, bundle = server
    serve.run(build_app(str(bundle), "ort-cpu", deadline_s=1e-4), name="hasty", route_prefix="/hasty")
    status, body = call(port, "/hasty/sample", {"n": 8, "seed": 1, "plan": "sequential"})
    assert status == 504 and body["field"] == "deadline"
    assert call(port, "/sample", {"n": 1, "seed": 1, "plan": "sequential"})[0] == 200  # the other app is fine


def test_healthz_and_metrics(server):
    port, _ = server
    status, health = call(port, "/healthz")
    assert status == 200 and health["status"] == "ok" and health["backend"] == "ort-cpu"
    call(port, "/sample", {"n": 1, "seed": 2, "plan": "sequential"})
    status, metrics = call(port, "/metrics")
    assert status == 200 and metrics["requests"] >= 1 and metrics["latency_seconds"]["p50"] is not None
