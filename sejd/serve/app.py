"""`sejd serve`: the sampling service (`sejd.serve.api`) on Ray Serve, one laptop or a Ray cluster.

Each replica builds its own FastAPI app over its own engines (`serve.ingress` with a builder function,
evaluated on the replica), and Ray Serve's `serve.batch` collects requests that arrive together (up to
`max_batch` requests or `batch_wait_ms`) into shared engine batches.

Locally, Ray is started bound to the requested host: its node address, its dashboard (off unless asked)
and Serve's HTTP proxy all use `host`, so `--host 127.0.0.1` opens nothing on other interfaces.
"""

from __future__ import annotations

import signal
import time

from sejd.serve.preflight import check_port, check_source, require_ray


def build_app(source: str, backend: str = "auto", replicas: int = 1, max_batch: int = 16,
              batch_wait_ms: float = 10.0, deadline_s: float = 60.0):
    from ray import serve

    def replica_app():  # runs on each replica: its engines are built once, there
        from sejd.serve.api import create_api
        from sejd.serve.service import SampleService
        from sejd.source import open_source

        batch = serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_ms / 1000.0)
        return create_api(SampleService(open_source(source, backend)), source, batch, deadline_s)

    ingress = serve.ingress(replica_app)()
    sampler = serve.deployment(name="SejdSampler", num_replicas=replicas,
                               max_ongoing_requests=max(64, 4 * max_batch))(ingress)
    return sampler.bind()


def start_ray(host: str, address: str | None, dashboard: bool) -> None:
    """Join the cluster at `address`, or start a local Ray instance listening on `host` only."""
    import ray

    if address is not None:
        ray.init(address=address, ignore_reinit_error=True)
        return
    ray.init(include_dashboard=dashboard, dashboard_host=host, _node_ip_address=host, ignore_reinit_error=True)


def serve_forever(source: str, backend: str = "auto", replicas: int = 1, max_batch: int = 16,
                  batch_wait_ms: float = 10.0, host: str = "127.0.0.1", port: int = 8000,
                  deadline_s: float = 60.0, address: str | None = None, dashboard: bool = False) -> None:
    require_ray()
    check_port(host, port)
    check_source(source, backend)
    from ray import serve

    def stop(signum, frame):  # SIGTERM (e.g. from a process manager) stops as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    start_ray(host, address, dashboard)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(source, backend, replicas, max_batch, batch_wait_ms, deadline_s), route_prefix="/")
        print(f"sejd serve: {source} on http://{host}:{port} (POST /sample, GET /healthz, /metrics, /docs); "
              f"Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()
