"""Latents to images for STARFlow text-to-image: the SD VAE (diffusers `AutoencoderKL`) from a local folder.

STARFlow samples in the latent space of `stabilityai/sd-vae-ft-ema` (4 channels, 8x downsampling); ml-starflow
decodes with `vae.decode(latents / scaling_factor).sample` (scaling_factor 0.18215 from the VAE's config) and
clamps the images to [-1, 1]. The VAE is loaded on first use with `local_files_only=True` (never downloaded)
and needs the `vae` extra (`pip install 'sejd[vae]'`). Without a VAE, sampling returns the latents.
"""

from __future__ import annotations

import logging
import os

import torch

from sejd.core.errors import CheckpointError, InputError
from sejd.core.extras import require
from sejd.workflows.text import _model_folder, _one_line

log = logging.getLogger(__name__)  # "sejd.workflows.vae": shown by the CLI on stderr (-q hides it)


class LatentDecoder:
    """A diffusers AutoencoderKL from a local folder, loaded on first use; `decode` maps latents (B, C, H, W)
    to images (B, 3, f*H, f*W) in [-1, 1] (C = 4 and f = 8 for the SD VAE)."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 16):
        self.path = _model_folder(path, "the VAE folder")
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, max(1, int(batch_size))
        self._vae = None

    def load(self) -> LatentDecoder:
        """Load the VAE (once); a missing package names the `vae` extra."""
        if self._vae is not None:
            return self
        diffusers = require("diffusers", "decoding latents to images (--vae)")
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(str(self.path), local_files_only=True,
                                                          low_cpu_mem_usage=False)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{self.path}: cannot load the VAE: {_one_line(e)}") from None
        self._vae = vae.to(device=self.device, dtype=self.dtype).eval()
        return self

    @property
    def scaling_factor(self) -> float:
        return float(self.load()._vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float | None:
        """The config's shift_factor (None for the SD VAE, whose latents are only scaled)."""
        shift = getattr(self.load()._vae.config, "shift_factor", None)
        return None if shift is None else float(shift)

    @property
    def latent_channels(self) -> int:
        return int(self.load()._vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        """Image pixels per latent position along each side (8 for the SD VAE)."""
        return 2 ** (len(self.load()._vae.config.block_out_channels) - 1)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, f*H, f*W) float32 in [-1, 1], on the latents' device:
        `vae.decode(latents / scaling_factor [+ shift_factor]).sample.clamp(-1, 1)`."""
        self.load()
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise InputError(f"latents to decode have shape {got}; expected (B, {self.latent_channels}, H, W)")
        if not latents.is_floating_point() or not torch.isfinite(latents).all():
            raise InputError(f"latents to decode must be finite floats, got {latents.dtype}"
                             + ("" if not latents.is_floating_point() else " with NaN or inf values"))
        scale, shift = self.scaling_factor, self.shift_factor
        images = []
        for start in range(0, latents.shape[0], self.batch_size):
            z = latents[start:start + self.batch_size].to(device=self.device, dtype=self.dtype) / scale
            if shift is not None:
                z = z + shift
            images.append(self._vae.decode(z).sample.clamp(-1, 1).float().to(latents.device))
        return torch.cat(images)


def latents_or_images(latents: torch.Tensor, vae_path: str | os.PathLike | None,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """Images in [-1, 1] decoded by the VAE at `vae_path`; without one, the latents unchanged (and a log line
    saying how to get images)."""
    if vae_path is None:
        log.info("returning latents, not images: decoding them needs --vae PATH (a local sd-vae-ft-ema folder) "
                 "and pip install 'sejd[vae]'")
        return latents
    return LatentDecoder(vae_path, device=device).decode(latents)
