"""`sejd serve` refuses what cannot work with one line, before Ray starts."""

import json
import socket
import sys

import pytest

from sejd.cli import main
from sejd.core.errors import SejdError
from sejd.serve import app as serve_app
from tests.serve.conftest import AUTO_PLANS, with_tuned_plans


@pytest.fixture(autouse=True)
def ray_must_not_start(monkeypatch):
    def started(*args, **kw):
        raise AssertionError("Ray was started")
    monkeypatch.setattr(serve_app, "start_ray", started)


def serve(source, **kw):
    serve_app.serve_forever(str(source), "ort-cpu", **{"host": "127.0.0.1", "port": free_port(), **kw})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("port", [0, 70000, -1])
def test_a_port_out_of_range(tiny_bundle, port, capsys):
    with pytest.raises(SejdError, match=r"--port must be a TCP port 1\.\.65535"):
        serve(tiny_bundle.path, port=port)
    assert main(["serve", str(tiny_bundle.path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sejd: error: --port") and err.count("\n") == 1


def test_a_port_in_use(tiny_bundle):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SejdError, match=f"port {busy.getsockname()[1]} on 127.0.0.1 is in use"):
            serve(tiny_bundle.path, port=busy.getsockname()[1])


def test_a_bad_source(tmp_path):
    with pytest.raises(SejdError):
        serve(tmp_path / "missing")
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_text("{")
    with pytest.raises(SejdError, match="not valid JSON"):
        serve(tmp_path / "bundle")


def test_a_bundle_without_the_backends_engines(tiny_bundle, tmp_path):
    import shutil
    shutil.copytree(tiny_bundle.path, tmp_path / "b", ignore=shutil.ignore_patterns("engines"))
    with pytest.raises(SejdError, match="no ort-cpu engines; build them"):
        serve(tmp_path / "b")


def test_an_invalid_tuned_plan_names_the_file(tiny_bundle, tmp_path):
    bundle = with_tuned_plans(tiny_bundle.path, tmp_path / "b", {1: AUTO_PLANS[1]})
    (bundle / "plans" / "batch-8.json").write_text(json.dumps({"blocks": [{"decoder": "jacobi", "tau": -1}] * 4}))
    with pytest.raises(SejdError, match=r"batch-8\.json.*tau must be a number >= 0"):
        serve(bundle)


def test_without_ray_the_error_names_the_extra(tiny_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(SejdError, match=r"pip install 'sejd\[serve\]'"):
        serve(tiny_bundle.path)


@pytest.mark.parametrize("host", ["no such host..", "a" * 300, "no-such-host.invalid"])
def test_an_unresolvable_host_is_an_input_error_exit_2(tiny_bundle, host, capsys):
    with pytest.raises(SejdError, match="is not an address of this machine"):
        serve(tiny_bundle.path, host=host)
    assert main(["serve", str(tiny_bundle.path), "--host", host]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sejd: error: --host") and err.count("\n") == 1


@pytest.mark.parametrize("seconds", [0, -1, float("nan"), float("inf"), True, "10"])
def test_a_read_deadline_that_is_not_a_time(tiny_bundle, seconds):
    with pytest.raises(SejdError, match=r"--read-timeout-s must be a finite number of seconds > 0"):
        serve(tiny_bundle.path, read_timeout_s=seconds)


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_serve_refuses_a_read_timeout_that_cannot_work(value, capsys):
    assert main(["serve", "builtin:digits", "--read-timeout-s", value]) == 2
    assert "--read-timeout-s must be a finite number of seconds > 0" in capsys.readouterr().err
