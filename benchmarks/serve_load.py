"""Load test of `sejd serve` on loopback: R requests from C concurrent clients, with and without batching.

    python benchmarks/serve_load.py BUNDLE --requests 200 --clients 16 --json docs/serve_load.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import socket
import statistics
import time
import urllib.request

from sejd.core.files import write_json


def _post(port, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/sample", data=json.dumps(body).encode(), method="POST")
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())
        status = r.status
    return status, time.perf_counter() - t0, out["batch_size"]


def run(source, backend, max_batch, requests, clients, n, plan):
    import ray
    from ray import serve

    from sejd.serve.app import build_app, start_ray
    from sejd.serve.read_limits import ReadLimits, runtime_env
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_ray("127.0.0.1", None, dashboard=False, runtime_env=runtime_env(ReadLimits()))  # as `sejd serve` does
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(source, backend, max_batch=max_batch, batch_wait_ms=10, replica_host="127.0.0.1")
    serve.run(app, route_prefix="/")
    bodies = [{"n": n, "seed": i, "plan": plan} for i in range(requests)]
    _post(port, bodies[0])  # warm-up
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda b: _post(port, b), bodies))
    wall = time.perf_counter() - t0
    serve.shutdown()
    ray.shutdown()
    lat = sorted(r[1] for r in results)
    return {"max_batch": max_batch, "requests": requests, "clients": clients, "n": n, "plan": plan,
            "errors": sum(r[0] != 200 for r in results), "wall_s": wall, "requests_per_s": requests / wall,
            "p50_ms": 1e3 * lat[len(lat) // 2], "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "mean_batch_samples": statistics.mean(r[2] for r in results)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("--backend", default="auto")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--plan", default="sequential")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = [run(a.source, a.backend, mb, a.requests, a.clients, a.n, a.plan) for mb in (16, 1)]
    for r in rows:
        print(f"max_batch {r['max_batch']:>2}: {r['requests_per_s']:6.1f} req/s, p50 {r['p50_ms']:7.1f} ms, "
              f"p99 {r['p99_ms']:7.1f} ms, mean engine batch {r['mean_batch_samples']:.1f}, errors {r['errors']}")
    if a.json:
        write_json(a.json, {"source": a.source, "backend": a.backend, "rows": rows})


if __name__ == "__main__":
    main()
