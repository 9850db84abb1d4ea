"""The sampling service core, independent of any server framework (Ray Serve's HTTP app and the Triton
model wrap it).

A request is validated at the edge into a `SampleRequest` (`parse`, with the schema of
`sejd.serve.schema`); `SampleService.run_batch` samples a list of requests that arrived together in as few
engine batches as possible and hands back each request's images as a tensor with its statistics
(`Sampled`); encoding them (png, npy, base64) is the HTTP layer's job. A request is the seeded request of
`sejd.runtime.request`: noise and labels from its seed, the plan made per-sample, so its images depend on its seed
only, whatever batch it rode in, and equal `sejd sample -n N --seed S --plan P --per-sample`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time

import torch

from sejd.core.errors import PlanError, SejdError
from sejd.runtime.plan import NAMED_PLANS, Plan
from sejd.runtime.request import per_sample_plan, seeded_labels, seeded_noise
from sejd.runtime.sampler import sample
from sejd.serve.schema import RequestError, SampleRequest, first_error, request_model
from sejd.workflows.source import Session

MAX_N = 64


@dataclasses.dataclass
class Sampled:
    """One request's result: its images and the statistics of the engine batch it rode in."""
    images: torch.Tensor  # (n, C, H, W) in [-1, 1]
    plan: str
    batch_size: int  # samples in the engine batch
    seconds: float  # the engine batch's sampling time
    blocks: list  # sejd.runtime.sampler.BlockStats, in sampling order


class SamplingFailed(Exception):
    """The engine batch a request rode in failed (a server fault, HTTP 500)."""


def served_plans(src: Session) -> dict[tuple, Plan]:
    """Every plan `src` may serve, resolved, validated and made per-sample, keyed by (name, tuned batch):
    the named plans and each tuned plan file. Done at start-up, so a broken tuned plan stops the service
    from starting (naming the file) instead of failing every request that uses it."""
    plans = {(name, None): per_sample_plan(src.plan(name)) for name in NAMED_PLANS}
    for batch, path in sorted(src.tuned_plans().items()):
        try:
            plan = src.plan(str(path))
        except SejdError as e:
            raise PlanError(f"cannot serve the tuned plan {path}: {e}") from None
        guidance = plan.meta.get("guidance", 0.0) if isinstance(plan.meta, dict) else None
        if not (isinstance(guidance, (int, float)) and not isinstance(guidance, bool) and math.isfinite(guidance)):
            raise PlanError(f"cannot serve the tuned plan {path}: meta.guidance must be a finite number, "
                            f"got {guidance!r}")
        plans[("auto", batch)] = per_sample_plan(plan)
    return plans


class SampleService:
    """Samples batches of requests on one Session (built once, e.g. per Ray Serve replica or Triton
    instance). `on_batch(size, blocks)` is called after every engine batch (the HTTP layer's metrics)."""

    def __init__(self, src: Session, max_n: int = MAX_N, on_batch=None):
        # one engine call never exceeds the bundle's batch_max: groups are split into chunks of it
        self.batch_max = src.bundle.batch_max if src.bundle is not None else max_n
        self.src, self.max_n, self.on_batch = src, min(max_n, self.batch_max), on_batch
        self.cfg = src.model.config
        self.plans = served_plans(src)
        self.tuned = sorted(b for name, b in self.plans if name == "auto")
        self.plan_names = NAMED_PLANS + (("auto",) if self.tuned else ())
        self.default_plan = "auto" if self.tuned else "sjd"  # the tuned plan when there is one
        self.schema = request_model(self.plan_names, self.default_plan, self.max_n, self.cfg.num_classes)
        self._lock = threading.Lock()  # runners hold per-batch state: one engine batch at a time

    def parse(self, body) -> SampleRequest:
        """A JSON object -> SampleRequest, or RequestError naming the field that is wrong."""
        import pydantic

        try:
            valid = self.schema.model_validate(body)
        except pydantic.ValidationError as e:
            raise first_error(e.errors(), self.schema) from None
        return self.check(SampleRequest(**valid.model_dump()))

    def check(self, req: SampleRequest) -> SampleRequest:
        """What the schema cannot say: `auto` is served only at the guidance it was tuned at (a plan tuned
        without guidance may need other tolerances with it), so other guidance is refused, naming both."""
        if req.plan != "auto":
            return req
        tuned_at = self.plans[self.plan_key(req)].meta.get("guidance", 0.0)
        if float(tuned_at) != req.guidance:
            raise RequestError("guidance", f"plan 'auto' was tuned at guidance {float(tuned_at):g}, the request "
                                           f"asks for {req.guidance:g}; use that guidance or a named plan")
        return req

    def plan_key(self, req: SampleRequest) -> tuple:
        """(plan name, tuned batch size): `auto` resolves by the request's own n, never by its batch-mates."""
        if req.plan != "auto":
            return (req.plan, None)
        return ("auto", min(self.tuned, key=lambda b: (abs(b - req.n), -b)))

    def run_batch(self, requests: list[SampleRequest]) -> list[Sampled | SamplingFailed]:
        """Sample every request; requests sharing plan and guidance ride in shared engine batches of at
        most batch_max samples. A failing engine batch fails only its own requests (SamplingFailed)."""
        results: list = [None] * len(requests)
        groups = collections.defaultdict(list)
        for i, r in enumerate(requests):
            groups[(r.guidance, self.plan_key(r))].append(i)
        for (guidance, key), idx in groups.items():
            for chunk in _chunks(idx, [requests[i].n for i in idx], self.batch_max):
                reqs = [requests[i] for i in chunk]
                try:
                    out = self._sample(reqs, guidance, key)
                except Exception as e:  # an engine fault: these requests fail, the others go on
                    out = [SamplingFailed(f"sampling failed: {type(e).__name__}: {e}")] * len(chunk)
                for i, res in zip(chunk, out):
                    results[i] = res
        return results

    def _sample(self, reqs: list[SampleRequest], guidance: float, key: tuple) -> list[Sampled]:
        cfg = self.cfg
        noise = torch.cat([seeded_noise(r.n, r.seed, cfg.num_tokens, cfg.token_dim) for r in reqs])
        labels = None
        if cfg.num_classes:
            labels = torch.cat([seeded_labels(r.n, r.label, cfg.num_classes) for r in reqs])
        t0 = time.perf_counter()
        with self._lock:
            out = sample(self.src.model, noise, labels=labels, guidance=guidance, runners=self.src.runners,
                         plan=self.plans[key], progress=False)
        seconds = time.perf_counter() - t0
        if self.on_batch is not None:
            self.on_batch(len(noise), out.stats.blocks)
        starts = [0]
        for r in reqs:
            starts.append(starts[-1] + r.n)
        return [Sampled(out.images[a:b], key[0], len(noise), seconds, out.stats.blocks)
                for a, b in zip(starts, starts[1:])]


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
