"""No client can stall the service: read deadlines and header limits (`sejd.serve.read_limits`), in the app
(in-process) and in Ray Serve's HTTP proxy server (Ray's own `start_asgi_http_server`, no Ray started),
and client disconnects counted apart from server faults."""

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sejd.serve.api import create_api
from sejd.serve.read_limits import ENV, ReadLimits, guard_server, install, runtime_env
from sejd.serve.service import SampleService
from sejd.workflows.source import open_source
from tests.serve.asgi import call
from tests.serve.sockets import read_answer


@pytest.fixture(scope="module")
def service(tuned_bundle):
    return SampleService(open_source(tuned_bundle, "ort-cpu"))


def by_status(app):
    text = call(app, "GET", "/metrics").body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {s.labels["status"]: s.value for s in families["sejd_requests"].samples if s.name == "sejd_requests_total"}


# --- in the app (what reaches a replica) ---

def test_a_stalled_body_gets_408_within_the_read_deadline(service):
    app = create_api(service, "tiny", read_timeout_s=0.3)
    r = call(app, "POST", "/sample", [b'{"n": 1, '], headers={"content-length": "100"}, then="stall")
    assert r.status == 408 and r.json()["field"] is None
    assert "not received within 0.3 s" in r.json()["error"] and "9 of 100 bytes" in r.json()["error"]
    assert r.headers["connection"] == "close"
    assert 0.3 <= r.seconds < 2.0
    assert by_status(app) == {"408": 1.0}


def test_a_body_that_arrives_in_time_is_served(service):
    app = create_api(service, "tiny", read_timeout_s=0.3)
    r = call(app, "POST", "/sample", [b'{"n": 1, ', b'"plan": "sjd"}'])
    assert r.status == 200 and r.json()["n"] == 1


@pytest.mark.parametrize("headers,why", [
    ({f"x-h{i}": "1" for i in range(101)}, "more than 100 header fields"),
    ({"x-big": "a" * (16 * 1024)}, "headers larger than 16384 bytes"),
])
def test_a_header_flood_gets_431(service, headers, why):
    app = create_api(service, "tiny")
    r = call(app, "POST", "/sample", {"n": 1, "plan": "sjd"}, headers=headers)
    assert (r.status, r.json()) == (431, {"error": f"request {why}", "field": None})
    assert r.received == 0  # the body was not read
    ok = call(app, "POST", "/sample", {"n": 1, "plan": "sjd"}, headers={f"x-h{i}": "1" for i in range(90)})
    assert ok.status == 200


def test_a_client_that_goes_away_is_counted_499_not_500(service, monkeypatch):
    app = create_api(service, "tiny")
    # mid-body: the server reports the disconnect; nobody is left to answer
    r = call(app, "POST", "/sample", [b'{"n": 1'], headers={"content-length": "50"}, then="disconnect")
    assert r.status is None
    # mid-sampling: Ray Serve's proxy cancels the request when its client disconnects
    real = service.run_batch
    monkeypatch.setattr(service, "run_batch", lambda reqs: (time.sleep(0.5), real(reqs))[1])
    r = call(app, "POST", "/sample", {"n": 1, "plan": "sjd"}, cancel_after=0.1)
    assert r.status is None
    assert by_status(app) == {"499": 2.0}
    assert call(app, "GET", "/metrics.json").json()["status"] == {"200": 1, "499": 2}  # and the /metrics call


# --- in Ray Serve's HTTP proxy server ---

LIMITS = ReadLimits(read_timeout_s=0.5)


class Echo:
    """An app standing in for Ray's proxy app: answers the body it got; `calls` counts what reached it."""

    def __init__(self):
        self.calls = 0

    async def __call__(self, scope, receive, send):
        self.calls += 1
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def proxy_server(app, limits=LIMITS):
    """Ray Serve's own proxy HTTP server start-up (`start_asgi_http_server`), wrapped as `install` wraps it
    in a proxy, serving `app` on a free loopback port."""
    from ray.serve._private.http_util import start_asgi_http_server
    from ray.serve.config import HTTPOptions

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop, started, stop = asyncio.new_event_loop(), threading.Event(), None

    async def main():
        nonlocal stop
        stop = asyncio.Event()
        task, server = await guard_server(start_asgi_http_server, limits)(
            app, HTTPOptions(host="127.0.0.1", port=port), event_loop=loop)
        while not server.started:
            await asyncio.sleep(0.01)
        started.set()
        await stop.wait()
        server.should_exit = True
        await task

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(30), "the proxy server did not start"
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


def test_headers_sent_a_byte_at_a_time_get_408_within_the_deadline():
    with proxy_server(Echo()) as port, socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.monotonic()
        for byte in b"POST / HTTP/1.1\r\nHost: x\r\n"[:6]:
            s.sendall(bytes([byte]))
            time.sleep(0.1)
        status, body, _ = read_answer(s)
        assert status == 408 and body["field"] is None and "headers not received within 0.5 s" in body["error"]
        assert time.monotonic() - t0 < 2.0


def test_a_stalled_body_is_refused_at_the_proxy_and_never_reaches_the_app():
    app = Echo()
    with proxy_server(app) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        status, body, took = read_answer(s)
        assert status == 408 and body["field"] is None and "1 of 100 bytes" in body["error"]
        assert took < 2.0
    assert app.calls == 0  # a replica's request slot was never taken


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\n" + b"".join(b"x-h%d: 1\r\n" % i for i in range(101)) + b"\r\n",  # 101 fields
    b"GET / HTTP/1.1\r\nx-big: " + b"a" * 17000 + b"\r\n\r\n",  # one field of 17 KB
    b"GET / HTTP/1.1\r\nx-big: " + b"a" * 200_000,  # a field that never ends
])
def test_a_header_flood_gets_431_at_the_proxy(head):
    app = Echo()
    with proxy_server(app) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head)
        status, body, took = read_answer(s)
        assert status == 431 and body["field"] is None and body["error"].startswith("request ")
        assert took < 4.0  # answered at once, closed after the linger
    assert app.calls == 0


def test_good_requests_pass_and_an_idle_connection_is_closed():
    app = Echo()
    with proxy_server(app) as port:
        with socket.create_connection(("127.0.0.1", port)) as s:  # two requests on one connection
            request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
            for _ in range(2):
                s.sendall(request)
                data = b""
                while not data.endswith(b"\r\n\r\n{}"):
                    data += s.recv(1000)
                assert data.startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", port)) as idle:
            status, body, took = read_answer(idle)
            assert status is None and body == b"" and took < 2.0  # closed, no answer
    assert app.calls == 2


def test_install_wraps_the_proxys_server_start_only_when_limits_are_set(monkeypatch):
    from ray.serve._private import proxy

    real = proxy.start_asgi_http_server
    monkeypatch.delenv(ENV, raising=False)
    install()
    assert proxy.start_asgi_http_server is real
    monkeypatch.setenv(ENV, LIMITS.to_env())
    monkeypatch.setattr(proxy, "start_asgi_http_server", real)
    install()
    install()  # idempotent
    assert proxy.start_asgi_http_server.sejd_read_limits == LIMITS


def test_the_hook_runs_without_importing_sejd(tmp_path):
    """The set-up hook is pickled by value: a proxy process runs it without importing sejd or torch."""
    import ray.cloudpickle

    env = runtime_env(LIMITS)
    (tmp_path / "hook.pkl").write_bytes(ray.cloudpickle.dumps(env["worker_process_setup_hook"]))
    code = ("import pickle, sys; from ray.serve._private import proxy; "
            f"pickle.loads(open({str(tmp_path / 'hook.pkl')!r}, 'rb').read())(); "
            "print(proxy.start_asgi_http_server.sejd_read_limits.read_timeout_s, "
            "[m for m in ('sejd', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **env["env_vars"]})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "0.5 []"
