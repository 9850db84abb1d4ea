"""`sejd serve` on a real local Ray instance on loopback (one Ray start-up for the module), serving the
tiny bundle on ONNX Runtime."""

import concurrent.futures
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from sejd.cli import main
from tests.serve.sockets import listening, read_answer

pytest.importorskip("ray.serve")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port, path, body=None, method=None, raw=False, timeout=120):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method or
                                 ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = r.read()
            return r.status, out if raw else json.loads(out)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tuned_bundle, tmp_path_factory):
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "sejd.cli", "serve", str(tuned_bundle), "--backend", "ort-cpu",
                             "--host", "127.0.0.1", "--port", str(port), "--max-batch", "8", "--batch-wait-ms", "100"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": root})
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if call(port, "/healthz")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"sejd serve did not come up:\n{log.read()[-3000:]}")
            time.sleep(1)
        yield port, tuned_bundle, proc
    finally:
        proc.send_signal(signal.SIGTERM)  # stops Serve and Ray as Ctrl-C does
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this fixture started
            proc.wait()
        log.close()


def test_nothing_listens_beyond_the_requested_host(server):
    port, _, proc = server
    sockets = listening(proc.pid)
    assert (("127.0.0.1", port) in {(a, p) for a, p, _ in sockets})  # Serve's proxy, where asked
    assert len({pid for _, _, pid in sockets}) >= 3  # GCS, raylet, proxy, replica ... were all inspected
    wide = [s for s in sockets if not ipaddress.ip_address(s[0]).is_loopback]
    assert not wide, f"listening beyond 127.0.0.1: {wide}"


def decode(result):
    import base64
    return np.frombuffer(base64.b64decode(result["data"]), np.float32).reshape(result["shape"])


def test_concurrent_requests_are_batched_and_each_gets_its_seeded_result(server, tmp_path):
    port, bundle, _ = server
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
    port, _, _ = server
    assert call(port, "/sample", {"n": 0}) [0] == 400 and call(port, "/sample", {"n": 0})[1]["field"] == "n"
    assert call(port, "/sample", b"{not json")[1]["field"] == "body"
    assert call(port, "/sample", {"plan": "warp"})[1]["field"] == "plan"
    assert call(port, "/sample", {"guidance": 1e308})[1]["field"] == "guidance"
    assert call(port, "/sample", b"x" * 70000) == (413, {"error": "body: larger than 65536 bytes "
                                                                  "(Content-Length 70000)", "field": "body"})
    assert call(port, "/nope") == (404, {"error": "path: no route GET /nope", "field": "path"})
    assert call(port, "/sample")[0] == 405


def test_healthz_docs_and_prometheus_metrics(server):
    port, _, _ = server
    status, health = call(port, "/healthz")
    assert status == 200 and health["status"] == "ok" and health["backend"] == "ort-cpu"
    assert "auto" in health["plans"]
    assert call(port, "/sample", {"n": 1, "seed": 2, "plan": "sequential"})[0] == 200
    call(port, "/nope")
    status, text = call(port, "/metrics", raw=True)
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    by_status = {s.labels["status"]: s.value for s in families["sejd_requests"].samples
                 if s.name == "sejd_requests_total"}
    assert status == 200 and by_status.get("200", 0) >= 1 and by_status.get("404", 0) >= 1
    assert any(s.name == "sejd_engine_batch_samples_count" and s.value >= 1
               for s in families["sejd_engine_batch_samples"].samples)
    assert call(port, "/metrics.json")[1]["latency_seconds"]["p50"] is not None
    assert call(port, "/openapi.json")[1]["components"]["schemas"]["SampleBody"]["additionalProperties"] is False


def by_status(port):
    text = call(port, "/metrics", raw=True)[1].decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {s.labels["status"]: s.value for s in families["sejd_requests"].samples if s.name == "sejd_requests_total"}


def test_slow_clients_hold_no_replica_slot_and_get_408_at_the_read_deadline(server):
    """70 stalled bodies (more than the replica's 64 request slots) and a header sent a byte at a time:
    a good request is served meanwhile, a header flood gets 431 at once, and the slow ones get 408 at the
    10 s read deadline (the default)."""
    import threading

    port, _, _ = server
    t0 = time.monotonic()
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(70)]
    for s in stalled:
        s.sendall(b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    trickle = socket.create_connection(("127.0.0.1", port))

    def drip():
        for byte in b"POST /sample HTTP/1.1\r\nHost: x\r\n":
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                return  # refused and closed
            time.sleep(0.5)
    threading.Thread(target=drip, daemon=True).start()
    time.sleep(1)
    status, body = call(port, "/sample", {"n": 1, "seed": 1, "plan": "sjd"}, timeout=30)
    assert status == 200 and time.monotonic() - t0 < 8  # long before the stalled ones' deadline
    with socket.create_connection(("127.0.0.1", port)) as flood:
        flood.sendall(b"GET /healthz HTTP/1.1\r\n" + b"".join(b"x-h%d: 1\r\n" % i for i in range(101)) + b"\r\n")
        assert read_answer(flood)[:2] == (431, {"error": "request more than 100 header fields", "field": None})
    answers = [read_answer(s, timeout=30) for s in stalled + [trickle]]
    assert {a[0] for a in answers} == {408}
    assert all(a[1]["field"] is None and "not received within 10 s" in a[1]["error"] for a in answers)
    assert time.monotonic() - t0 < 20
    for s in stalled + [trickle]:
        s.close()
    assert "408" not in by_status(port)  # refused at the proxy: never reached the replica


def test_a_client_that_disconnects_is_counted_499_not_500(server):
    port, _, _ = server
    before = by_status(port)
    body = json.dumps({"n": 64, "seed": 3, "plan": "sjd"}).encode()
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]
    for s in clients:  # queued behind each other in the replica, then gone
        s.sendall(b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(0.3)
    for s in clients:
        s.close()
    time.sleep(5)
    after = by_status(port)
    assert after.get("500", 0) == before.get("500", 0)
    assert after.get("499", 0) > before.get("499", 0)
