"""One diffusion training draw: encode, sample timesteps and noise, noisy latents and the regression target."""

from __future__ import annotations

import torch
from torch import nn

from losses.diffusion_target import noisy_and_target

__all__ = ["encode_images", "noisy_and_target", "sample_noise", "sample_pair_noise", "sample_timesteps"]


@torch.no_grad()
def encode_images(vae: nn.Module, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[-1, 1] pixels -> scaled latents (posterior sample drawn from ``generator``)."""
    dist = vae.encode(pixels.to(vae.dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(
        dist.mean.device, dist.mean.dtype
    )
    latents = dist.mean + dist.std * noise
    return latents * vae.config.scaling_factor


def sample_timesteps(
    batch: int, num_train_timesteps: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator).to(device)


def sample_noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def sample_pair_noise(
    latents_blend: torch.Tensor, latents_fg: torch.Tensor, generator: torch.Generator, shared: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise of a stage-2 (blend, fg) pair: independent draws (DualAnoDiff), or ONE draw used by both
    branches (``shared``: the seed's stage 2, ``--dual_mode shared``)."""
    noise_blend = sample_noise(latents_blend, generator)
    if shared:
        if latents_fg.shape != latents_blend.shape:
            raise ValueError(f"branch latents differ in shape: {latents_blend.shape} vs {latents_fg.shape}")
        return noise_blend, noise_blend
    return noise_blend, sample_noise(latents_fg, generator)
