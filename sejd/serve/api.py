"""The HTTP face of the sampling service: a FastAPI app over one `SampleService`.

    POST /sample        {"n", "seed", "label", "guidance", "plan", "format"} -> images + per-block statistics
                        a STARFlow: {"n", "seed", "text_embeddings" | "prompt", "uncond_text_embeddings",
                        "guidance", "plan", "format"} -> latents (npy, base64) or images (png, with a VAE)
    GET  /healthz       {"status": "ok", ...}
    GET  /metrics       Prometheus text format: requests by status, latency, engine batch sizes, iterations
    GET  /metrics.json  the same as JSON, with latency percentiles
    GET  /docs, /openapi.json

Every 4xx body is `{"error": ..., "field": ...}` naming what was wrong (the field, "body", "path" or
"method"); 413 for a body over 64 KiB (a STARFlow's: plus room for two (max_n, Lt, Dt) embeddings); 408 (field null) for a body not received within the read
deadline, 431 for too many or too large headers (`sejd.serve.read_limits`); 500 only for a fault of the
server (an engine batch that failed); 504 past the deadline. `/metrics` counts a request whose client went
away before its answer under status 499, not 500. `sejd.serve.app` runs this app on Ray Serve
(`serve.ingress`), one per replica; the tests run it in-process. Routes are relative, so the app works
under any route prefix.
"""

import asyncio
import base64
import io
import time
from typing import Optional

import numpy as np

from sejd.serve.metrics import CLIENT_CLOSED, Metrics
from sejd.serve.read_limits import READ_TIMEOUT_S, BodyLimit, ReadLimits
from sejd.serve.schema import RequestError, first_error
from sejd.serve.service import SampleService, SamplingFailed


def unbatched(run_batch):
    """Each request in its own engine batch (where Ray Serve's `serve.batch` is not available)."""
    async def submit(req):
        return (await run_batch([req]))[0]
    return submit


def create_api(service: SampleService, source: str = "", batch=unbatched, deadline_s: float = 60.0,
               read_timeout_s: float = READ_TIMEOUT_S):
    """The FastAPI app. `batch` turns `async run_batch(list) -> list` into `async submit(request) ->
    result`, collecting requests that arrive together (Ray Serve's `serve.batch`); `read_timeout_s`: the
    time a request's body may take to arrive."""
    from fastapi import Body, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    metrics = Metrics()
    service.on_batch = metrics.record_batch
    schema = service.schema
    app = FastAPI(title="sejd sampling service", summary=f"samples from {source or 'a TarFlow'}")

    @batch
    async def submit(requests):
        # the engines are synchronous: run them off the event loop so requests keep arriving
        return await asyncio.get_running_loop().run_in_executor(None, service.run_batch, requests)

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return JSONResponse(e.to_dict(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return JSONResponse(first_error(e.errors(), schema).to_dict(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        # FastAPI's own 4xx: no such route, wrong method, a body it could not parse
        if e.status_code == 404:
            error = RequestError("path", f"no route {request.method} {request.url.path}", 404)
        elif e.status_code == 405:
            error = RequestError("method", f"{request.method} is not allowed here; "
                                           f"allowed: {e.headers.get('Allow', '') if e.headers else ''}", 405)
        else:
            error = RequestError("body" if e.status_code == 400 else "request", str(e.detail), e.status_code)
        return JSONResponse(error.to_dict(), status_code=e.status_code, headers=e.headers)

    @app.post("/sample")
    async def sample(body: Optional[schema] = Body(None)) -> dict:
        """Sample `n` images from the request's seed; the same seed gives the same images whatever
        batch the request rides in."""
        req = service.check(service.request(body or schema()))
        try:
            result = await asyncio.wait_for(submit(req), timeout=deadline_s)
        except asyncio.TimeoutError:
            raise RequestError("deadline", f"deadline of {deadline_s} s exceeded", status=504) from None
        if isinstance(result, SamplingFailed):
            return JSONResponse({"error": str(result), "field": "engine"}, status_code=500)
        if service.starflow:  # latents, or the images the VAE decoded from them (png)
            content = {"content": "images" if result.decoded is not None else "latents",
                       **encode(result.images if result.decoded is None else result.decoded, req.format)}
        else:
            content = encode(result.images, req.format)
        return {"n": req.n, "seed": req.seed, "plan": result.plan, "batch_size": result.batch_size,
                "seconds": result.seconds, **content,
                "blocks": [{"block": b.block, "decoder": b.decoder, "iterations": b.iterations,
                            "seconds": b.seconds} for b in result.blocks]}

    started = time.time()

    @app.get("/healthz")
    async def healthz() -> dict:
        cfg = service.cfg
        about = {"status": "ok", "source": source, "backend": service.src.backend, "plans": list(service.plan_names),
                 "uptime_s": time.time() - started, "image": [cfg.in_channels, cfg.img_size, cfg.img_size],
                 "max_n": service.max_n}
        if service.starflow:  # "image": the latents' shape
            return {**about, "family": "starflow", "text": list(service.text_shape or ()),
                    "text_encoder": service.text_encoder is not None, "vae": service.vae is not None}
        return {**about, "num_classes": cfg.num_classes}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/metrics.json")
    async def metrics_json() -> dict:
        return metrics.to_dict()

    limits = ReadLimits(read_timeout_s=read_timeout_s, max_body_bytes=service.max_body_bytes)
    app.add_middleware(BodyLimit, limits=limits, json_body=True)
    app.add_middleware(RecordStatus, metrics=metrics)  # added last: outermost, so it sees 408s and 413s too
    return app


class RecordStatus:
    """ASGI middleware counting every HTTP answer by status code, with its latency. A request that ends
    without an answer counts as CLIENT_CLOSED (499) when its client went away (a disconnect message, or
    the server cancelling the request, as Ray Serve's proxy does when the client disconnects), else as
    500 (an unhandled fault)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, gone = time.perf_counter(), [None], [False]

        async def record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def watch():
            message = await receive()
            if message["type"] == "http.disconnect":
                gone[0] = True
            return message
        fault = False
        try:
            await self.app(scope, watch, record)
        except asyncio.CancelledError:
            gone[0] = True
            raise
        except Exception:
            fault = True
            raise
        finally:
            if status[0] is None:
                status[0] = CLIENT_CLOSED if gone[0] and not fault else 500
            self.metrics.record_request(status[0], time.perf_counter() - t0)


def encode(images, fmt: str) -> dict:
    """images (n, C, H, W) in [-1, 1] -> the response fields of a format."""
    if fmt == "png":
        from sejd.core.util import grid_png_bytes
        return {"format": "png", "png": base64.b64encode(grid_png_bytes(images)).decode()}
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, images.numpy())
        return {"format": "npy", "npy": base64.b64encode(buf.getvalue()).decode()}
    return {"format": "base64", "dtype": "float32", "shape": list(images.shape),
            "data": base64.b64encode(images.numpy().astype(np.float32).tobytes()).decode()}
