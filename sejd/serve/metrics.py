"""What the service reports: Prometheus metrics at `/metrics` (one CollectorRegistry per replica, so two
services in one process never share counters) and a JSON view with latency percentiles at `/metrics.json`."""

from __future__ import annotations

import collections

import numpy as np

CLIENT_CLOSED = 499  # the status a request is counted under when its client went away before the answer
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ITERATION_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Requests by status code, latency, engine batch sizes and Jacobi iterations per block."""

    def __init__(self, keep: int = 10000):
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("sejd_requests", "HTTP requests by status code (499: the client went away "
                                     "before the answer)", ["status"],
                                     registry=self.registry)
        self.latency = prom.Histogram("sejd_request_latency_seconds", "time from request to response",
                                      buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = prom.Histogram("sejd_engine_batch_samples", "samples per engine batch",
                                         buckets=BATCH_BUCKETS, registry=self.registry)
        self.iterations = prom.Histogram("sejd_block_iterations", "iterations a block took per engine batch",
                                         ["block"], buckets=ITERATION_BUCKETS, registry=self.registry)
        # the JSON view's percentiles come from the latest `keep` observations
        self.statuses: collections.Counter = collections.Counter()
        self.latencies: collections.deque = collections.deque(maxlen=keep)
        self.batch_sizes: collections.deque = collections.deque(maxlen=keep)
        self.block_iterations: dict[int, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=keep))

    def record_request(self, status: int, seconds: float) -> None:
        self.requests.labels(status=str(status)).inc()
        self.latency.observe(seconds)
        self.statuses[status] += 1
        self.latencies.append(seconds)

    def record_batch(self, size: int, blocks) -> None:
        self.batch_size.observe(size)
        self.batch_sizes.append(size)
        for b in blocks:
            self.iterations.labels(block=str(b.block)).observe(b.iterations)
            self.block_iterations[b.block].append(b.iterations)

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) in Prometheus' text exposition format."""
        import prometheus_client as prom

        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST

    def to_dict(self) -> dict:
        lat = sorted(self.latencies)

        def pct(p):
            return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else None
        return {"requests": sum(self.statuses.values()),
                "errors": sum(c for s, c in self.statuses.items() if s >= 400),
                "status": {str(s): c for s, c in sorted(self.statuses.items())},
                "latency_seconds": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "count": len(lat)},
                "batch_size": {"mean": float(np.mean(self.batch_sizes)) if self.batch_sizes else None,
                               "max": max(self.batch_sizes, default=None), "batches": len(self.batch_sizes)},
                "iterations_per_block": {str(k): float(np.mean(v)) for k, v in sorted(self.block_iterations.items())}}
