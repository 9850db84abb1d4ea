"""`sejd serve`: the sampling service on Ray Serve (one laptop or a Ray cluster, same code).

HTTP JSON API:
    POST /sample   {"n", "seed", "label", "guidance", "plan", "format"} -> images + per-block statistics
    GET  /healthz  -> {"status": "ok", ...}
    GET  /metrics  -> requests, batch sizes, latency percentiles, iterations per block

Requests that arrive together are batched (Ray Serve's `serve.batch`, up to `max_batch` requests or
`batch_wait_ms`), sampled in shared engine batches and split back. Engines are built once per replica.
Bad requests get 4xx with the field named; an engine failure gets 500 and the replica keeps serving;
a request that outlives `deadline_s` gets 504.
"""

from __future__ import annotations

import asyncio
import json
import time

from sejd.serve.service import RequestError, SampleService
from sejd.source import open_source

MAX_BODY_BYTES = 64 * 1024


def build_app(source: str, backend: str = "auto", replicas: int = 1, max_batch: int = 16,
              batch_wait_ms: float = 10.0, deadline_s: float = 60.0):
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=replicas, max_ongoing_requests=max(64, 4 * max_batch))
    class SejdSampler:
        def __init__(self):
            self.service = SampleService(open_source(source, backend))  # engines built once per replica
            self.started = time.time()

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_ms / 1000.0)
        async def sample_batch(self, requests):
            # the engines are synchronous: run them off the event loop so requests keep arriving
            return await asyncio.get_running_loop().run_in_executor(None, self.service.run_batch, requests)

        async def __call__(self, request):
            # routes are matched by their last segment, so the app can sit under any route prefix
            path, method = "/" + request.url.path.rstrip("/").rsplit("/", 1)[-1], request.method
            if method == "GET" and path == "/healthz":
                cfg = self.service.cfg
                return JSONResponse({"status": "ok", "source": source, "backend": self.service.src.backend,
                                     "plans": list(self.service.plan_names), "uptime_s": time.time() - self.started,
                                     "image": [cfg.in_channels, cfg.img_size, cfg.img_size],
                                     "num_classes": cfg.num_classes})
            if method == "GET" and path == "/metrics":
                return JSONResponse(self.service.metrics.to_dict())
            if path != "/sample":
                return JSONResponse({"error": f"no route {method} {path}", "field": "path"}, status_code=404)
            if method != "POST":
                return JSONResponse({"error": "use POST /sample", "field": "method"}, status_code=405)
            t0 = time.perf_counter()
            try:
                raw = await request.body()
                if len(raw) > MAX_BODY_BYTES:
                    raise RequestError("body", f"larger than {MAX_BODY_BYTES} bytes", status=413)
                try:
                    body = json.loads(raw or b"{}")
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                    raise RequestError("body", f"not valid JSON ({str(e)[:80]})") from None
                req = self.service.parse(body)
                result = await asyncio.wait_for(self.sample_batch(req), timeout=deadline_s)
                if "error" in result:  # the engine batch it rode in failed
                    raise RuntimeError(result["error"])
            except RequestError as e:
                self.service.metrics.record_request(time.perf_counter() - t0, ok=False)
                return JSONResponse(e.to_dict(), status_code=e.status)
            except asyncio.TimeoutError:
                self.service.metrics.record_request(time.perf_counter() - t0, ok=False)
                return JSONResponse({"error": f"deadline of {deadline_s} s exceeded", "field": "deadline"},
                                    status_code=504)
            except Exception as e:  # an engine failure: report it, keep the replica serving
                self.service.metrics.record_request(time.perf_counter() - t0, ok=False)
                message = str(e) if str(e).startswith("sampling failed") else f"sampling failed: {type(e).__name__}: {e}"
                return JSONResponse({"error": message, "field": "engine"}, status_code=500)
            self.service.metrics.record_request(time.perf_counter() - t0)
            return JSONResponse(result)

    return SejdSampler.bind()


def serve_forever(source: str, backend: str = "auto", replicas: int = 1, max_batch: int = 16,
                  batch_wait_ms: float = 10.0, host: str = "127.0.0.1", port: int = 8000,
                  deadline_s: float = 60.0, address: str | None = None) -> None:
    import ray
    from ray import serve

    import signal

    def stop(signum, frame):  # SIGTERM (e.g. from a process manager) stops as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(source, backend, replicas, max_batch, batch_wait_ms, deadline_s), route_prefix="/")
    print(f"sejd serve: {source} on http://{host}:{port} (POST /sample, GET /healthz, GET /metrics); Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
