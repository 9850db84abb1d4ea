"""The sampling service core, independent of any server framework (Ray Serve and Triton wrap it).

A request is validated at the edge into a `SampleRequest`; `SampleService.run_batch` samples a list of
requests that arrived together in as few engine batches as possible and splits the results back.
One sample is reproducible from its seed whatever batch it rode in: every Jacobi block of the served
plan stops per sample (`per_sample`), so no sample waits on another's convergence, and on ONNX Runtime
per-row results do not depend on the batch (checked bit for bit in the tests).
"""

from __future__ import annotations

import base64
import collections
import copy
import dataclasses
import io
import math
import threading
import time

import numpy as np
import torch

from sejd.errors import SejdError
from sejd.runtime.plan import NAMED_PLANS, Plan
from sejd.runtime.sampler import sample
from sejd.source import Source

FORMATS = ("png", "npy", "base64")
MAX_N = 64


class RequestError(SejdError):
    """A request that cannot be served as given (HTTP 4xx); names the offending field."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status

    def to_dict(self) -> dict:
        return {"error": str(self), "field": self.field}


@dataclasses.dataclass(frozen=True)
class SampleRequest:
    n: int = 1
    seed: int = 0
    label: int | None = None
    guidance: float = 0.0
    plan: str = "auto"
    format: str = "base64"



def parse_request(body, num_classes: int, plans: tuple[str, ...], max_n: int = MAX_N) -> SampleRequest:
    """A JSON object -> SampleRequest, or RequestError naming the field that is wrong."""
    if not isinstance(body, dict):
        raise RequestError("body", f"expected a JSON object, got {type(body).__name__}")
    fields = {f.name for f in dataclasses.fields(SampleRequest)}
    unknown = sorted(set(body) - fields)
    if unknown:
        raise RequestError(unknown[0], f"unknown field; expected some of {sorted(fields)}")

    def integer(name, default):
        v = body.get(name, default)
        if v is None and name == "label":
            return None
        if not isinstance(v, int) or isinstance(v, bool):
            raise RequestError(name, f"expected an integer, got {v!r}")
        return v

    n, seed, label = integer("n", 1), integer("seed", 0), integer("label", None)
    if not 1 <= n <= max_n:
        raise RequestError("n", f"expected 1..{max_n}, got {n}")
    if not 0 <= seed < 2**63:
        raise RequestError("seed", f"expected 0..2**63-1, got {seed}")
    if label is not None and not (-1 <= label < num_classes):
        raise RequestError("label", f"expected -1..{num_classes - 1} (this model has {num_classes} classes), "
                                    f"got {label}" if num_classes else "this model is unconditional: omit label")
    guidance = body.get("guidance", 0.0)
    try:
        ok = isinstance(guidance, (int, float)) and not isinstance(guidance, bool) and \
            math.isfinite(guidance) and guidance >= 0
    except OverflowError:  # an integer too large for a float
        ok = False
    if not ok:
        raise RequestError("guidance", f"expected a finite number >= 0, got {str(guidance)[:40]}")
    plan = body.get("plan", "auto" if "auto" in plans else "sjd")  # default: the tuned plan when there is one
    if plan not in plans:
        raise RequestError("plan", f"unknown plan {plan!r}; expected one of {list(plans)}")
    fmt = body.get("format", "base64")
    if fmt not in FORMATS:
        raise RequestError("format", f"expected one of {list(FORMATS)}, got {fmt!r}")
    return SampleRequest(n, seed, label, float(guidance), plan, fmt)


def request_noise(req: SampleRequest, num_tokens: int, token_dim: int) -> torch.Tensor:
    """The noise `sejd sample -n N --seed S` draws: a request's samples depend on its seed only."""
    g = torch.Generator().manual_seed(req.seed)
    return torch.randn(req.n, num_tokens, token_dim, generator=g)


def request_labels(req: SampleRequest, num_classes: int) -> torch.Tensor | None:
    """As `sejd sample`: the given label for every sample, else classes in turn for conditional models."""
    if req.label is not None:
        return torch.full((req.n,), req.label, dtype=torch.long)
    return torch.arange(req.n) % num_classes if num_classes else None


class SampleService:
    """Samples batches of requests on one Source (built once, e.g. per Ray Serve replica)."""

    def __init__(self, src: Source, max_n: int = MAX_N):
        # one engine call never exceeds the bundle's batch_max: groups are split into chunks of it
        self.batch_max = int(src.bundle.manifest.get("batch_max", max_n)) if src.bundle is not None else max_n
        self.src, self.max_n = src, min(max_n, self.batch_max)
        self.cfg = src.model.config
        self.plan_names = tuple(p for p in NAMED_PLANS + ("auto",) if p != "auto" or src.tuned_plans())
        self._plans: dict = {}
        self.metrics = Metrics()
        self._lock = threading.Lock()  # runners hold per-batch state: one engine batch at a time

    def parse(self, body) -> SampleRequest:
        return parse_request(body, self.cfg.num_classes, self.plan_names, self.max_n)

    def plan_key(self, req: SampleRequest):
        """(plan name, tuned batch size): `auto` resolves by the request's own n, never by its batch-mates."""
        if req.plan != "auto":
            return (req.plan, None)
        tuned = self.src.tuned_plans()
        return ("auto", min(tuned, key=lambda b: (abs(b - req.n), -b)) if tuned else None)

    def served_plan(self, key) -> Plan:
        """The plan with per-sample stopping on every Jacobi block. GS-Jacobi blocks, which stop a
        segment on the batch's largest residual, are served as per-sample Jacobi at the same tau."""
        if key not in self._plans:
            name, batch = key
            plan = copy.deepcopy(self.src.plan(name, batch))
            for b in plan.blocks:
                if b.decoder in ("jacobi", "gs-jacobi"):
                    b.decoder, b.variant, b.freeze, b.per_sample, b.segments = "jacobi", "host", False, True, 1
            self._plans[key] = plan
        return self._plans[key]

    def run_batch(self, requests: list[SampleRequest]) -> list[dict]:
        """Sample every request; requests sharing plan and guidance ride in shared engine batches of at
        most batch_max samples. A failing group fails only its own requests ({"error": ...})."""
        results: list = [None] * len(requests)
        groups = collections.defaultdict(list)
        for i, r in enumerate(requests):
            groups[(r.guidance, self.plan_key(r))].append(i)
        for (guidance, key), idx in groups.items():
            for chunk in _chunks(idx, [requests[i].n for i in idx], self.batch_max):
                try:
                    self._run_group(requests, chunk, guidance, key, results)
                except Exception as e:  # an engine or plan failure: these requests fail, the others go on
                    for i in chunk:
                        results[i] = {"error": f"sampling failed: {type(e).__name__}: {e}"}
        return results

    def _run_group(self, requests, idx, guidance, key, results):
        plan_name = key[0]
        reqs = [requests[i] for i in idx]
        noise = torch.cat([request_noise(r, self.cfg.num_tokens, self.cfg.token_dim) for r in reqs])
        labels = None
        if self.cfg.num_classes:
            labels = torch.cat([request_labels(r, self.cfg.num_classes) for r in reqs])
        t0 = time.perf_counter()
        with self._lock:
            out = sample(self.src.model, noise, labels=labels, guidance=guidance, runners=self.src.runners,
                         plan=self.served_plan(key), progress=False)
        seconds = time.perf_counter() - t0
        self.metrics.record_batch(len(noise), seconds, out.stats)
        start = 0
        for i, r in zip(idx, reqs):
            images = out.images[start:start + r.n]
            start += r.n
            results[i] = {"n": r.n, "seed": r.seed, "plan": plan_name, "batch_size": len(noise),
                          "seconds": seconds, **encode(images, r.format),
                          "blocks": [{"block": b.block, "decoder": b.decoder, "iterations": b.iterations,
                                      "seconds": b.seconds} for b in out.stats.blocks]}


def _chunks(idx: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    """Consecutive runs of requests whose samples add up to at most `limit` (one request is <= limit)."""
    chunks, current, total = [], [], 0
    for i, n in zip(idx, sizes):
        if current and total + n > limit:
            chunks.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    return chunks + ([current] if current else [])


def encode(images: torch.Tensor, fmt: str) -> dict:
    """images (n, C, H, W) in [-1, 1] -> the response fields of a format."""
    if fmt == "png":
        from sejd.util import grid_png_bytes
        return {"format": "png", "png": base64.b64encode(grid_png_bytes(images)).decode()}
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, images.numpy())
        return {"format": "npy", "npy": base64.b64encode(buf.getvalue()).decode()}
    return {"format": "base64", "dtype": "float32", "shape": list(images.shape),
            "data": base64.b64encode(images.numpy().astype(np.float32).tobytes()).decode()}


class Metrics:
    """Counters a /metrics endpoint reports: requests, batch sizes, latency percentiles, iterations."""

    def __init__(self, keep: int = 10000):
        self.keep = keep
        self.requests = self.errors = 0
        self.latencies: collections.deque = collections.deque(maxlen=keep)
        self.batch_sizes: collections.deque = collections.deque(maxlen=keep)
        self.iterations: dict[int, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=keep))

    def record_request(self, seconds: float, ok: bool = True):
        self.requests += 1
        self.errors += not ok
        self.latencies.append(seconds)

    def record_batch(self, size: int, seconds: float, stats):
        self.batch_sizes.append(size)
        for b in stats.blocks:
            self.iterations[b.block].append(b.iterations)

    def to_dict(self) -> dict:
        lat = sorted(self.latencies)

        def pct(p):
            return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else None
        return {"requests": self.requests, "errors": self.errors,
                "latency_seconds": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "count": len(lat)},
                "batch_size": {"mean": float(np.mean(self.batch_sizes)) if self.batch_sizes else None,
                               "max": max(self.batch_sizes, default=None), "batches": len(self.batch_sizes)},
                "iterations_per_block": {str(k): float(np.mean(v)) for k, v in sorted(self.iterations.items())}}
