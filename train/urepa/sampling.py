"""Class-conditional sampling with classifier-free guidance restricted to a noise-level interval.

Guidance interval (REPA's ``guidance_low``/``guidance_high``, Kynkaanniemi et al. 2024): REPA's samplers
run time from t=1 (noise) to t=0 (data) and apply CFG only while ``guidance_low <= t <= guidance_high``,
so with ``guidance_high=0.7`` the noisiest 30 % of the trajectory is sampled without guidance. For a
discrete DDPM schedule we use the same rule on ``t / T`` (``T`` = number of training timesteps, 1000),
i.e. CFG only for timesteps ``<= 0.7 * 1000``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from models.schedulers import SCHEDULERS as SAMPLERS  # noqa: F401  (re-exported for the CLIs)
from models.schedulers import make_scheduler as _make_scheduler
from models.schedulers import step_kwargs

_PREDICTION_TYPES = {"v": "v_prediction", "epsilon": "epsilon"}


def make_scheduler(base_config: dict[str, Any], sampler: str, prediction: str):
    """The shared sampler factory (:func:`models.schedulers.make_scheduler`) for a U-REPA model.

    ``prediction`` is the training target ("v" or "epsilon"); the scheduler must know it to turn model
    outputs into x0/eps.
    """
    prediction_type = _PREDICTION_TYPES.get(prediction)
    if prediction_type is None:
        raise ValueError(f"prediction must be 'v' or 'epsilon', got {prediction!r}")
    return _make_scheduler(sampler, base_config, prediction_type)


def guidance_active(
    timestep: float, num_train_timesteps: int, cfg_scale: float, low: float, high: float
) -> bool:
    """REPA's rule: guide only when cfg_scale > 1 and low <= t/T <= high."""
    frac = float(timestep) / float(num_train_timesteps)
    return cfg_scale > 1.0 and low <= frac <= high


@torch.no_grad()
def sample_latents(
    denoise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    cond: torch.Tensor,
    null: torch.Tensor,
    scheduler: Any,
    latent_shape: tuple[int, int, int],
    num_steps: int = 25,
    cfg_scale: float = 7.5,
    guidance_low: float = 0.0,
    guidance_high: float = 0.7,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``scheduler`` from pure noise; ``denoise(x, t, context)`` returns the model output.

    cond: [B,77,dim] prompt embeddings; null: [77,dim] or [B,77,dim] unconditional embedding.
    """
    if not 0.0 <= guidance_low <= guidance_high <= 1.0:
        raise ValueError(f"need 0 <= guidance_low <= guidance_high <= 1, got {guidance_low}, {guidance_high}")
    b = cond.shape[0]
    device = cond.device
    if null.ndim == 2:
        null = null.unsqueeze(0).expand(b, -1, -1)
    scheduler.set_timesteps(num_steps, device=device)
    if noise is None:
        noise = torch.randn((b, *latent_shape), generator=generator, device="cpu").to(device)
    x = noise * scheduler.init_noise_sigma
    total = int(scheduler.config.num_train_timesteps)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        t_batch = t.expand(b) if t.ndim == 0 else t
        if guidance_active(float(t), total, cfg_scale, guidance_low, guidance_high):
            out = denoise(torch.cat([x_in, x_in]), torch.cat([t_batch, t_batch]), torch.cat([cond, null]))
            out_cond, out_uncond = out.float().chunk(2)
            out = out_uncond + cfg_scale * (out_cond - out_uncond)
        else:
            out = denoise(x_in, t_batch, cond).float()
        x = scheduler.step(out, t, x, **step_kwargs(scheduler, generator)).prev_sample
    return x


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """SD latents (already multiplied by the scaling factor) -> images in [-1, 1], fp32."""
    scale = float(vae.config.scaling_factor)
    dtype = next(vae.parameters()).dtype
    out = [
        vae.decode((chunk / scale).to(dtype)).sample.float().clamp(-1, 1)
        for chunk in latents.split(batch_size)
    ]
    return torch.cat(out)
