"""The diffusion training pair (x_t, regression target) from a diffusers noise scheduler: the one place where
every trainer (anomaly stages, U-REPA) noises latents and builds its target."""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")
_ALIASES = {"v": "v_prediction", "eps": "epsilon"}


def prediction_type_name(kind: str) -> str:
    """'v' / 'eps' config spellings -> the diffusers names 'v_prediction' / 'epsilon'."""
    kind = _ALIASES.get(kind, kind)
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction type {kind!r} (epsilon / eps or v_prediction / v)")
    return kind


def noisy_and_target(
    noise_scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scheduler.add_noise(x0, eps, t), target)``: target eps, or v = alpha_t eps - sigma_t x0
    (``scheduler.get_velocity``). ``prediction_type`` defaults to the scheduler config's."""
    kind = prediction_type_name(prediction_type or noise_scheduler.config.prediction_type)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise if kind == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    return noisy, target
