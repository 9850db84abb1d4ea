"""The sampling service core, independent of any server framework (Ray Serve's HTTP app and the Triton
model wrap it).

A request is validated at the edge into a `SampleRequest` (`parse`, with the schema of
`sejd.serve.schema`); `SampleService.run_batch` samples a list of requests that arrived together in as few
engine batches as possible and hands back each request's images as a tensor with its statistics
(`Sampled`); encoding them (png, npy, base64) is the HTTP layer's job. A request is the seeded request of
`sejd.runtime.request`: noise and labels from its seed, the plan made per-sample, so its images depend on its seed
only, whatever batch it rode in, and equal `sejd sample -n N --seed S --plan P --per-sample`.

A STARFlow (text-to-image) request carries text embeddings (or prompts, encoded by the service's local T5
encoder) and answers latents (or images through the service's local VAE). It is sampled alone, in its own
engine batch, with the plan `sejd sample` resolves (not made per-sample: STARFlow's `sejd sample` has no
--per-sample, and float round-off differs between batch sizes), so its latents equal `sejd sample SOURCE -n N
--seed S --plan P --text-embeddings F [--uncond-text-embeddings U] --guidance G` bit for bit.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import threading
import time

import torch

from sejd.core.errors import PlanError, SejdError
from sejd.runtime.plan import EXTRA_PLANS, NAMED_PLANS, Plan
from sejd.runtime.request import per_sample_plan, seeded_labels, seeded_noise
from sejd.runtime.sampler import sample
from sejd.serve.read_limits import MAX_BODY_BYTES
from sejd.serve.schema import (
    RequestError,
    SampleRequest,
    decode_text,
    first_error,
    npy_b64_bytes,
    request_model,
    starflow_request_model,
)
from sejd.workflows.source import Session

MAX_N = 64


def is_starflow(cfg) -> bool:
    return hasattr(cfg, "text_block")


def text_shape(cfg) -> tuple[int, int] | None:
    """(Lt, Dt) of a STARFlow with a text block, else None."""
    return (cfg.txt_size, cfg.txt_dim) if is_starflow(cfg) and cfg.text_block is not None else None


def max_body_bytes(cfg, max_n: int = MAX_N) -> int:
    """The largest request body a source's service reads: 64 KiB, plus for a STARFlow with text room for
    text_embeddings and uncond_text_embeddings of max_n rows each (base64 .npy)."""
    shape = text_shape(cfg)
    return MAX_BODY_BYTES + (2 * npy_b64_bytes(max_n, *shape) if shape else 0)


def check_extras(cfg, text_encoder=None, vae=None) -> None:
    """--text-encoder and --vae serve STARFlow sources only."""
    for flag, given in (("--text-encoder", text_encoder), ("--vae", vae)):
        if given is not None and not is_starflow(cfg):
            raise SejdError(f"{flag} is for STARFlow (text-to-image) sources; this source is a TarFlow")
    if text_encoder is not None and text_shape(cfg) is None:
        raise SejdError("--text-encoder: this STARFlow model has no text block: it takes no text")


@dataclasses.dataclass
class Sampled:
    """One request's result: its images and the statistics of the engine batch it rode in."""
    images: torch.Tensor  # (n, C, H, W) in [-1, 1]
    plan: str
    batch_size: int  # samples in the engine batch
    seconds: float  # the engine batch's sampling time
    blocks: list  # sejd.runtime.sampler.BlockStats, in sampling order
    decoded: torch.Tensor | None = None  # STARFlow with format png: the latents through the VAE, in [-1, 1]


class SamplingFailed(Exception):
    """The engine batch a request rode in failed (a server fault, HTTP 500)."""


def served_plans(src: Session) -> dict[tuple, Plan]:
    """Every plan `src` may serve, resolved, validated and made per-sample, keyed by (name, tuned batch):
    the named plans and each tuned plan file. Done at start-up, so a broken tuned plan stops the service
    from starting (naming the file) instead of failing every request that uses it. A STARFlow's plans are
    served as `sejd sample` resolves them (not per-sample; its requests are sampled alone), Apple's sampler
    ("starflow") among them."""
    starflow = is_starflow(src.model.config)
    own = (lambda plan: plan) if starflow else per_sample_plan
    plans = {(name, None): own(src.plan(name)) for name in NAMED_PLANS + (EXTRA_PLANS if starflow else ())}
    for batch, path in sorted(src.tuned_plans().items()):
        try:
            plan = src.plan(str(path))
        except SejdError as e:
            raise PlanError(f"cannot serve the tuned plan {path}: {e}") from None
        guidance = plan.meta.get("guidance", 0.0) if isinstance(plan.meta, dict) else None
        if not (isinstance(guidance, (int, float)) and not isinstance(guidance, bool) and math.isfinite(guidance)):
            raise PlanError(f"cannot serve the tuned plan {path}: meta.guidance must be a finite number, "
                            f"got {guidance!r}")
        plans[("auto", batch)] = own(plan)
    return plans


class SampleService:
    """Samples batches of requests on one Session (built once, e.g. per Ray Serve replica or Triton
    instance). `on_batch(size, blocks)` is called after every engine batch (the HTTP layer's metrics).

    A STARFlow source may have `text_encoder` (a local T5 folder, or a TextEncoder) for prompts and `vae` (a
    local SD-VAE folder, or a LatentDecoder) for png answers; both are loaded here, at start-up, never
    downloaded."""

    def __init__(self, src: Session, max_n: int = MAX_N, on_batch=None, text_encoder=None, vae=None):
        # one engine call never exceeds the bundle's batch_max: groups are split into chunks of it
        self.batch_max = src.bundle.batch_max if src.bundle is not None else max_n
        self.src, self.max_n, self.on_batch = src, min(max_n, self.batch_max), on_batch
        self.cfg = src.model.config
        self.starflow, self.text_shape = is_starflow(self.cfg), text_shape(self.cfg)
        check_extras(self.cfg, text_encoder, vae)
        self.plans = served_plans(src)
        self.tuned = sorted(b for name, b in self.plans if name == "auto")
        extra = EXTRA_PLANS if self.starflow else ()
        self.plan_names = NAMED_PLANS + extra + (("auto",) if self.tuned else ())
        self.default_plan = "auto" if self.tuned else "sjd"  # the tuned plan when there is one
        self.text_encoder, self.vae, self.uncond_default = self._load_extras(text_encoder, vae)
        if self.starflow:
            self.schema = starflow_request_model(self.plan_names, self.default_plan, self.max_n, self.text_shape,
                                                 self.text_encoder is not None, self.vae is not None)
        else:
            self.schema = request_model(self.plan_names, self.default_plan, self.max_n, self.cfg.num_classes)
        self.max_body_bytes = max_body_bytes(self.cfg, self.max_n)
        self._lock = threading.Lock()  # runners hold per-batch state: one engine batch at a time
        # PyTorch's intra-op thread count is per thread (OpenMP): engine batches run on the HTTP layer's worker
        # threads, which would otherwise use the default count and round differently from this thread
        self.torch_threads = torch.get_num_threads()

    def _load_extras(self, text_encoder, vae):
        """(encoder, vae, the unconditional text (Lt, Dt) of guidance by default): loaded now, so a bad folder,
        a missing extra or a width that does not fit stops the service from starting."""
        uncond = None
        if isinstance(text_encoder, (str, os.PathLike)):
            from sejd.workflows.text import TextEncoder

            text_encoder = TextEncoder(text_encoder)
        if text_encoder is not None:
            from sejd.workflows.text import unconditional_embedding

            uncond = unconditional_embedding(*self.text_shape, text_encoder.load())[0]  # checks the width
        if isinstance(vae, (str, os.PathLike)):
            from sejd.workflows.vae import LatentDecoder

            vae = LatentDecoder(vae)
        if vae is not None and vae.load().latent_channels != self.cfg.in_channels:
            raise SejdError(f"the VAE at {vae.path} takes {vae.latent_channels}-channel latents; this model "
                            f"samples {self.cfg.in_channels}")
        return text_encoder, vae, uncond

    def parse(self, body) -> SampleRequest:
        """A JSON object -> SampleRequest, or RequestError naming the field that is wrong."""
        import pydantic

        try:
            valid = self.schema.model_validate(body)
        except pydantic.ValidationError as e:
            raise first_error(e.errors(), self.schema) from None
        return self.check(self.request(valid))

    def request(self, valid) -> SampleRequest:
        """A validated body (an instance of `schema`) -> SampleRequest; a STARFlow's text decoded and checked."""
        fields = valid.model_dump()
        if not self.starflow:
            return SampleRequest(**fields)
        text_b64, uncond_b64, prompt = (fields.pop(f) for f in ("text_embeddings", "uncond_text_embeddings",
                                                                 "prompt"))
        n = fields.pop("n")
        if self.text_shape is None:
            for name, value in (("text_embeddings", text_b64), ("uncond_text_embeddings", uncond_b64),
                                ("prompt", prompt)):
                if value is not None:
                    raise RequestError(name, "this STARFlow model has no text block: it takes no text; omit it")
            return SampleRequest(n=n or 1, label=None, **fields)
        Lt, Dt = self.text_shape
        if text_b64 is not None and prompt is not None:
            raise RequestError("prompt", "give text_embeddings or prompt, not both")
        text = None
        if prompt is not None:
            if self.text_encoder is None:
                raise RequestError("prompt", "this service has no text encoder (start it with --text-encoder DIR, "
                                             "a local T5 folder); give text_embeddings: base64 of a float32 .npy "
                                             f"of shape (n, {Lt}, {Dt}) or ({Lt}, {Dt})")
            prompt = (prompt,) if isinstance(prompt, str) else tuple(prompt)
            if not prompt:
                raise RequestError("prompt", "an empty list; expected a prompt or n prompts")
            rows = len(prompt)
        elif text_b64 is not None:
            text = decode_text("text_embeddings", text_b64, Lt, Dt)
            rows = text.shape[0]
        else:
            raise RequestError("text_embeddings", f"missing: a STARFlow samples from text: give text_embeddings "
                                                  f"(base64 of a float32 .npy of shape (n, {Lt}, {Dt}) or "
                                                  f"({Lt}, {Dt}))" + (" or prompt" if self.text_encoder else ""))
        what = "prompt" if prompt is not None else "text_embeddings"
        n = n if n is not None else rows
        if n > self.max_n:
            raise RequestError(what, f"{rows} rows: more than the {self.max_n} samples a request may ask for")
        if rows not in (1, n):
            raise RequestError(what, f"{rows} rows for n {n}; expected 1 (every sample's) or n")
        uncond = None
        if uncond_b64 is not None:
            uncond = decode_text("uncond_text_embeddings", uncond_b64, Lt, Dt)
            if uncond.shape[0] not in (1, n):
                raise RequestError("uncond_text_embeddings", f"{uncond.shape[0]} rows for n {n}; expected 1 "
                                                             f"(every sample's) or n")
            uncond = uncond[0] if uncond.shape[0] == 1 else uncond
        return SampleRequest(n=n, label=None, text=text, uncond_text=uncond, prompt=prompt, **fields)

    def check(self, req: SampleRequest) -> SampleRequest:
        """What the schema cannot say: `auto` is served only at the guidance it was tuned at (a plan tuned
        without guidance may need other tolerances with it), so other guidance is refused, naming both;
        png of a STARFlow needs the VAE."""
        if self.starflow and req.format == "png" and self.vae is None:
            raise RequestError("format", "png needs a VAE to decode the latents: this service has none (start it "
                                         "with --vae DIR, a local SD-VAE folder); ask for npy or base64 latents")
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
        if torch.get_num_threads() != self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        results: list = [None] * len(requests)
        groups = collections.defaultdict(list)
        for i, r in enumerate(requests):
            # a STARFlow request rides alone: its latents are those of `sejd sample` with its arguments
            groups[(r.guidance, self.plan_key(r)) + ((i,) if self.starflow else ())].append(i)
        for (guidance, key, *_), idx in groups.items():
            for chunk in _chunks(idx, [requests[i].n for i in idx], self.batch_max):
                reqs = [requests[i] for i in chunk]
                try:
                    out = self._sample_text(reqs[0], key) if self.starflow else self._sample(reqs, guidance, key)
                except Exception as e:  # an engine fault: these requests fail, the others go on
                    out = [SamplingFailed(f"sampling failed: {type(e).__name__}: {e}")] * len(chunk)
                for i, res in zip(chunk, out):
                    results[i] = res
        return results

    def _sample_text(self, req: SampleRequest, key: tuple) -> list[Sampled]:
        """One STARFlow request, alone: as `sejd sample` does it (text rows expanded to n, the unconditional
        text given, else the encoder's encoding of "", else zeros), then the VAE for png."""
        cfg = self.cfg
        noise = seeded_noise(req.n, req.seed, cfg.num_tokens, cfg.token_dim)
        t0 = time.perf_counter()
        with self._lock:
            text, uncond = req.text, req.uncond_text
            if self.text_shape is not None:
                if req.prompt is not None:
                    text = self.text_encoder.encode(list(req.prompt), self.text_shape[0])
                text = text.expand(req.n, -1, -1) if text.shape[0] == 1 else text
                if uncond is None:
                    uncond = self.uncond_default
            out = sample(self.src.model, noise, plan=self.plans[key], guidance=req.guidance, text=text,
                         uncond_text=uncond, runners=self.src.runners, progress=False)
            seconds = time.perf_counter() - t0
            decoded = self.vae.decode(out.images) if req.format == "png" else None
        if self.on_batch is not None:
            self.on_batch(req.n, out.stats.blocks)
        return [Sampled(out.images, key[0], req.n, seconds, out.stats.blocks, decoded)]

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
