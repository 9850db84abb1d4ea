"""`sejd serve`: the sampling service (`sejd.serve.api`) on Ray Serve, one laptop or a Ray cluster.

Each replica builds its own FastAPI app over its own engines (`serve.ingress` with a builder function,
evaluated on the replica), and Ray Serve's `serve.batch` collects requests that arrive together (up to
`max_batch` requests or `batch_wait_ms`) into shared engine batches.

Locally, Ray is started bound to the requested host: its node address, its dashboard (off unless asked)
and Serve's HTTP proxy all use `host`, so `--host 127.0.0.1` opens nothing on other interfaces.

The job's Ray workers carry `sejd.serve.read_limits`' set-up hook, so the HTTP proxies this job starts
bound how long and how much a client may take to send a request (read deadline, header and body limits),
and a request reaches a replica only once its body has arrived.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import time

from sejd.serve.preflight import (
    check_port,
    check_read_timeout,
    check_source,
    host_address,
    require_ray,
)
from sejd.serve.read_limits import READ_TIMEOUT_S, ReadLimits, runtime_env


def build_app(source: str, backend: str = "auto", replicas: int = 1, max_batch: int = 16,
              batch_wait_ms: float = 10.0, deadline_s: float = 60.0, replica_host: str | None = None,
              config: dict | None = None, read_timeout_s: float = READ_TIMEOUT_S, text_encoder: str | None = None,
              vae: str | None = None):
    """The Serve application; `replica_host`: the one address replicas listen on (a single local node);
    `config`: the model config of a checkpoint source (as `--config`); `read_timeout_s`: the time a
    request's body may take to arrive at the app; `text_encoder`, `vae`: a STARFlow's local T5 and SD-VAE
    folders (each replica loads them at start-up)."""
    from ray import serve

    def replica_app():  # runs on each replica: its engines are built once, there
        from sejd.serve.api import create_api
        from sejd.serve.service import SampleService
        from sejd.workflows.source import open_source

        if replica_host is not None:
            keep_replica_grpc_on(replica_host)

        batch = serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_ms / 1000.0)
        service = SampleService(open_source(source, backend, config=config), text_encoder=text_encoder, vae=vae)
        return create_api(service, source, batch, deadline_s, read_timeout_s)

    ingress = serve.ingress(replica_app)()
    sampler = serve.deployment(name="SejdSampler", num_replicas=replicas,
                               max_ongoing_requests=max(64, 4 * max_batch))(ingress)
    return sampler.bind()


LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's switch for single-machine, loopback-only nodes
ALL_INTERFACES = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host_address(host)[1][0]).is_loopback


def keep_replica_grpc_on(host: str) -> None:
    """Ray Serve starts each replica's inter-deployment gRPC server on [::]:0, whatever the node address,
    with no option to change it; on a single node bound to `host`, bind that server to `host` as well.
    Called in the replica before Serve starts the server; a Ray without this hook is left as it is."""
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "sejd_host", None) == host:
        return
    address = f"[{host}]" if ":" in host else host

    def on_host(server, listen: str):
        if listen.startswith("[::]:"):
            listen = f"{address}:{listen.rsplit(':', 1)[1]}"
        return bind(server, listen)
    on_host.sejd_host = host
    replica.add_port_to_grpc_server = on_host


def start_ray(host: str, address: str | None, dashboard: bool, runtime_env: dict | None = None) -> None:
    """Join the cluster at `address`, or start a local Ray instance listening on `host` only; `runtime_env`:
    the job's (`sejd.serve.read_limits.runtime_env`).

    Ray turns a loopback node address into the machine's external one (so that other nodes can join) and
    its servers then listen there; for a loopback host, Ray's single-machine mode keeps every Ray server
    (GCS, raylet, workers, agents) on loopback instead. Its environment variable must be set before the
    Ray processes start, and Ray reads it at import, hence the constant set too."""
    if address is not None:
        import ray

        ray.init(address=address, ignore_reinit_error=True, runtime_env=runtime_env)
        return
    options = {"include_dashboard": dashboard, "ignore_reinit_error": True, "runtime_env": runtime_env}
    if host not in ALL_INTERFACES:
        options.update(dashboard_host=host, _node_ip_address=host)
    if is_loopback(host):
        os.environ[LOCAL_ONLY_ENV] = "0"
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    import ray

    ray.init(**options)


def serve_forever(source: str, backend: str = "auto", replicas: int = 1, max_batch: int = 16,
                  batch_wait_ms: float = 10.0, host: str = "127.0.0.1", port: int = 8000,
                  deadline_s: float = 60.0, address: str | None = None, dashboard: bool = False,
                  config: dict | None = None, read_timeout_s: float = READ_TIMEOUT_S, text_encoder: str | None = None,
                  vae: str | None = None) -> None:
    """`read_timeout_s`: how long a client may take to send a request's headers, and then its body
    (`sejd.serve.read_limits`); `text_encoder`, `vae`: a STARFlow's local T5 and SD-VAE folders."""
    from sejd.serve.service import max_body_bytes

    check_read_timeout(read_timeout_s)
    require_ray()
    check_port(host, port)
    cfg = check_source(source, backend, config, text_encoder, vae)
    import ray
    from ray import serve

    limits = ReadLimits(read_timeout_s=read_timeout_s, max_body_bytes=max_body_bytes(cfg))  # STARFlow: text room
    start_ray(host, address, dashboard, runtime_env(limits))

    def stop(signum, frame):  # SIGTERM (e.g. from a process manager) stops as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # after ray.init, which installs a handler of its own
    try:
        serve.start(http_options={"host": host, "port": port})
        local = address is None and host not in ALL_INTERFACES  # one node, on `host` only
        app = build_app(source, backend, replicas, max_batch, batch_wait_ms, deadline_s,
                        replica_host=host_address(host)[1][0] if local else None, config=config,
                        read_timeout_s=read_timeout_s, text_encoder=text_encoder, vae=vae)
        serve.run(app, route_prefix="/")
        print(f"sejd serve: {source} on http://{host}:{port} (POST /sample, GET /healthz, /metrics, /docs); "
              f"Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
