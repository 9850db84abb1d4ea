"""Sampling: prior noise -> image, one block at a time in sampling order, each with its planned decoder."""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from sejd.core.errors import InputError
from sejd.core.memory import check_fits, sampling_estimate
from sejd.core.util import progress as progress_bar
from sejd.model.starflow import StarFlow
from sejd.model.tarflow import TarFlow
from sejd.runtime.decoders import decode_block
from sejd.runtime.plan import TIMING_ONLY, Plan, resolve_plan
from sejd.runtime.runner import BlockRunner, Conditioning, peak_rss_bytes


@dataclasses.dataclass
class BlockStats:
    block: int  # model block index
    order: int  # position in sampling order (0 = applied first)
    decoder: str
    iterations: int
    seconds: float
    residual: float
    converged: bool = True
    residuals: list[float] = dataclasses.field(default_factory=list)
    sample_iterations: list[int] | None = None  # per sample, when samples stop on their own


@dataclasses.dataclass
class SampleStats:
    plan: str
    blocks: list[BlockStats]  # in sampling order
    seconds: float
    denoise_seconds: float = 0.0
    peak_rss_bytes: int = 0  # the process's peak resident memory when sampling ended (ru_maxrss)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        rows = [f"{'order':>5} {'block':>5} {'decoder':<11} {'iters':>6} {'seconds':>9} {'share':>6} {'residual':>9}"]
        for b in self.blocks:
            share = b.seconds / self.seconds if self.seconds else 0.0
            note = "" if b.converged else "  (fixed iterations)" if TIMING_ONLY in self.plan else \
                "  (capped, finished exactly)"
            rows.append(f"{b.order:>5} {b.block:>5} {b.decoder:<11} {b.iterations:>6} {b.seconds:>9.4f} "
                        f"{share:>6.1%} {b.residual:>9.2e}{note}")
        rows.append(f"plan {self.plan}: {self.seconds:.4f} s total" +
                    (f" (+{self.denoise_seconds:.4f} s denoise)" if self.denoise_seconds else ""))
        return "\n".join(rows)


@dataclasses.dataclass
class SampleResult:
    images: torch.Tensor  # (B, C, H, W), roughly in [-1, 1]
    stats: SampleStats
    sequence: list[torch.Tensor] | None = None  # images after the prior and after each block (ml-tarflow)


def validate_inputs(model: TarFlow, noise, labels):
    cfg = model.config
    check_noise(noise, cfg)
    return validate_labels(cfg, noise, labels)


def check_noise(noise, cfg) -> None:
    """Prior noise (B, T, D) in float32, finite, B >= 1; InputError naming expected and got otherwise."""
    expected = (cfg.num_tokens, cfg.token_dim)
    if not torch.is_tensor(noise) or noise.dim() != 3 or tuple(noise.shape[1:]) != expected:
        got = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
        raise InputError(f"noise must have shape (batch, {expected[0]}, {expected[1]}) "
                         f"(batch, tokens, token width), got {got}")
    if noise.dtype != torch.float32:
        raise InputError(f"noise must be float32 (the model's dtype), got {noise.dtype}")
    if noise.shape[0] < 1:
        raise InputError("noise must hold at least one sample (batch >= 1), got batch 0")
    if not bool(torch.isfinite(noise).all()):
        bad = int((~torch.isfinite(noise)).sum())
        raise InputError(f"noise contains {bad} non-finite values (NaN or inf); expected finite Gaussian noise")


def validate_labels(cfg, noise, labels):
    if labels is None:
        return None
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"labels must be integers (a tensor, list or int), got {labels!r}") from None
    if labels.dim() == 0:
        labels = labels.expand(noise.shape[0])
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise InputError(f"labels must be integers, got {labels.dtype}")
    if tuple(labels.shape) != (noise.shape[0],):
        raise InputError(f"labels must have shape ({noise.shape[0]},) to match the noise batch, got {tuple(labels.shape)}")
    if not cfg.num_classes:
        if bool((labels >= 0).any()):
            raise InputError("this model is unconditional (num_classes=0); labels must be None or -1")
        return None
    bad = (labels < -1) | (labels >= cfg.num_classes)
    if bool(bad.any()):
        raise InputError(f"labels must be in [0, {cfg.num_classes - 1}] or -1 (unconditional), "
                         f"got out-of-range values {sorted(set(labels[bad].tolist()))}")
    return labels.long()


def validate_text(model: StarFlow, noise, labels, text, uncond_text, guidance, guide_what, attn_temp,
                  annealed_guidance):
    """STARFlow's conditioning -> (text (B, Lt, Dt) or None, uncond_text (B, Lt, Dt) or None).

    uncond_text (Lt, Dt) or (B, Lt, Dt): the unconditional rows under guidance, ml-starflow's encoding of the
    empty caption "" (sample.py appends "" captions). sejd has no text encoder, so it cannot make that
    encoding itself: without one given, zeros are used (what a fully padded, masked caption gives; NOT the
    T5 encoding of "", whose tokens are not all padding) -- pass the real one to match ml-starflow."""
    check_noise(noise, model.config)
    B = noise.shape[0]
    if labels is not None:
        raise InputError("STARFlow models are text-conditioned: labels must be None (pass text embeddings)")
    if guide_what != "ab" or annealed_guidance:
        raise InputError("guide_what and annealed_guidance are ml-tarflow's guidance options; STARFlow's guidance "
                         "has neither (ml-starflow's schedule has no effect): leave them at 'ab' and False")
    if attn_temp != 1:
        raise InputError(f"attn_temp must be 1 for STARFlow (ml-starflow's Jacobi sampler ignores it), got {attn_temp}")
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or math.isnan(guidance) or guidance < 0:
        raise InputError(f"guidance must be a number >= 0, got {guidance!r}")
    if model.config.txt_dim and text is None:
        raise InputError(f"this STARFlow model is text-conditioned: text embeddings of shape "
                         f"({B}, {model.config.txt_size}, {model.config.txt_dim}) are needed, got None")
    text = model.check_text(text, B)
    if text is None or not guidance > 0:
        if uncond_text is not None and text is None:
            raise InputError("uncond_text needs a text-conditioned model")
        return text, None
    cfg = model.config
    if uncond_text is None:
        uncond_text = torch.zeros(B, cfg.txt_size, cfg.txt_dim)
    elif torch.is_tensor(uncond_text) and uncond_text.dim() == 2:
        uncond_text = uncond_text.expand(B, -1, -1)
    return text, model.check_text(uncond_text, B, "uncond_text")


def check_working_set(model: TarFlow, batch: int, guided: bool) -> None:
    """Refuse a batch whose caches and images cannot fit where the model runs, before allocating any of it
    (the noise, already allocated by the caller, is not counted again)."""
    cfg = model.config.memory_view() if isinstance(model, StarFlow) else model.config
    need = sampling_estimate(cfg, batch, guided).without("noise")
    check_fits(need.total, f"sampling a batch of {batch}{' with guidance' if guided else ''} "
               f"({need.describe()})", device=model.var.device, advice="use a smaller batch")


def sample(model: TarFlow, noise: torch.Tensor, labels=None, plan: "str | Plan" = "sjd", guidance: float = 0.0,
           guide_what: str = "ab", attn_temp: float = 1.0, annealed_guidance: bool = False, denoise: bool = False,
           runners: list[BlockRunner] | None = None, keep_sequence: bool = False, progress: bool = True,
           tau: float | None = None, text: torch.Tensor | None = None,
           uncond_text: torch.Tensor | None = None) -> SampleResult:
    """Decode prior noise (B, T, D) into images with a plan; per-block statistics come with the result.

    `runners` selects the backend (one BlockRunner per model block); default: the PyTorch model itself.
    `plan="reference"` runs ml-tarflow's own sampling loop instead (the speed baseline).
    A StarFlow model takes `text` embeddings (B, Lt, Dt) instead of labels and, under guidance, `uncond_text`
    (see `validate_text`: zeros by default); its "images" are latents (B, c, H, W) for the VAE decoder.
    """
    if isinstance(model, StarFlow):
        return _sample_starflow(model, noise, plan, guidance, guide_what, attn_temp, annealed_guidance, denoise,
                                runners, keep_sequence, progress, tau, labels, text, uncond_text)
    labels = validate_inputs(model, noise, labels)
    if not isinstance(guide_what, str) or set(guide_what) - set("ab"):
        raise InputError(f"guide_what must be made of 'a' and 'b', got {guide_what!r}")
    for name, value in (("guidance", guidance), ("attn_temp", attn_temp)):
        if not isinstance(value, (int, float)) or value != value:
            raise InputError(f"{name} must be a number, got {value!r}")
    if attn_temp <= 0:
        raise InputError(f"attn_temp must be > 0, got {attn_temp}")
    check_working_set(model, noise.shape[0], guidance > 0 and bool(guide_what))
    device = model.var.device  # sampling runs where the model is; images come back on the CPU
    noise = noise.to(device)
    labels = None if labels is None else labels.to(device)
    if str(plan) == "reference":
        from sejd.runtime.mltarflow_loop import reference_sample
        result = reference_sample(model, noise, labels, guidance, guide_what, attn_temp, annealed_guidance,
                                  progress=progress)
    else:
        cond = Conditioning.build(noise.shape[0], model.config.num_tokens, None if labels is None else labels.cpu(),
                                  guidance, guide_what,
                                  attn_temp, annealed_guidance)
        result = _sample_with_plan(model, noise, cond, resolve_plan(plan, model.config.num_blocks, tau),
                                   runners, keep_sequence, progress)
    if denoise:
        t0 = time.perf_counter()
        result.images = self_denoise(model, result.images, labels)
        result.stats.denoise_seconds = time.perf_counter() - t0
    result.images = result.images.cpu()
    result.stats.peak_rss_bytes = peak_rss_bytes()
    return result


def _sample_starflow(model, noise, plan, guidance, guide_what, attn_temp, annealed_guidance, denoise, runners,
                     keep_sequence, progress, tau, labels, text, uncond_text) -> SampleResult:
    text, uncond_text = validate_text(model, noise, labels, text, uncond_text, guidance, guide_what, attn_temp,
                                      annealed_guidance)
    if str(plan) == "reference":
        raise InputError("plan 'reference' is ml-tarflow's own loop; for STARFlow use 'starflow' (ml-starflow's "
                         "Jacobi sampler) or 'sequential' (its exact reverse)")
    check_working_set(model, noise.shape[0], uncond_text is not None)
    device = model.var.device
    noise = noise.to(device)
    cond = Conditioning.build_text(noise.shape[0], model.config.num_tokens + 1, text, uncond_text, float(guidance))
    result = _sample_with_plan(model, noise, cond, resolve_plan(plan, model.config.num_blocks, tau), runners,
                               keep_sequence, progress)
    if denoise:
        t0 = time.perf_counter()
        result.images = model.self_denoise(result.images, None if text is None else text.to(device))
        result.stats.denoise_seconds = time.perf_counter() - t0
    result.images = result.images.cpu()
    result.stats.peak_rss_bytes = peak_rss_bytes()
    return result


def _sample_with_plan(model, noise, cond, plan, runners, keep_sequence, progress) -> SampleResult:
    cfg = model.config
    if runners is None:
        from sejd.runtime.torch_runner import torch_runners
        runners = torch_runners(model)
    batch = noise.shape[0]
    with torch.no_grad():
        x = noise * model.var.sqrt()
    sequence = [model.unpatchify(noise)] if keep_sequence else None  # ml-tarflow: the noise before scaling
    stats, started = [], time.perf_counter()
    for order, k in enumerate(reversed(range(cfg.num_blocks))):
        block, runner, bp = model.blocks[k], runners[k], plan.blocks[k]
        z = block.to_runner(block.permute(x))  # STARFlow: the start token becomes runtime token 0
        runner.check_input(z, batch)
        bar = progress_bar(total=block.spec.run_tokens - 1, desc=f"block {k} ({bp.decoder})", enabled=progress)
        t0 = time.perf_counter()
        runner.begin(batch, cond)
        decoded = decode_block(runner, z, bp, block.to_runner(block.permute(noise)), bar=bar, cond=cond)
        seconds = time.perf_counter() - t0
        bar.close()
        x = block.permute(block.from_runner(decoded.x))
        stats.append(BlockStats(k, order, bp.decoder, decoded.iterations, seconds, decoded.residual,
                                decoded.converged, decoded.residuals, decoded.sample_iterations))
        if keep_sequence:
            sequence.append(model.unpatchify(x))
    name = plan.name + (f" [{TIMING_ONLY}]" if any(b.fixed_iters for b in plan.blocks) else "")
    return SampleResult(model.unpatchify(x), SampleStats(name, stats, time.perf_counter() - started), sequence)


def self_denoise(model: TarFlow, images: torch.Tensor, labels=None, noise_std: float | None = None) -> torch.Tensor:
    """TarFlow's post-step for models trained on noisy data: x + sigma^2 * grad_x log p(x), per sample."""
    sigma = getattr(model, "noise_std", 0.0) if noise_std is None else noise_std
    if not sigma:
        raise InputError("self-denoising needs the training noise std: this checkpoint does not record one "
                         "(pass noise_std, or use a checkpoint whose name or config gives it)")
    with torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        logp = model.log_prob(x, labels).sum()  # samples are independent, so one backward gives every gradient
        (grad,) = torch.autograd.grad(logp, x)
    return (x + sigma**2 * grad).detach()
