"""U-REPA loss for SD-1.5: ``L = L_diff + lambda * mean_layers(L_token + w * L_manifold)``.

- ``L_diff``: MSE to the v target (default, ``v = alpha_t * eps - sigma_t * x0``) or to eps, with
  ``alpha_t = sqrt(alphabar_t)``, ``sigma_t = sqrt(1 - alphabar_t)``; x_t and the target come from the
  diffusers noise scheduler (``losses/diffusion_target.py``, shared with the anomaly trainers).
- ``L_token``: mean over batch and tokens of ``1 - cos(u, d)`` between U-Net head tokens and DINO tokens.
- ``L_manifold``: MSE between the B x B cosine Gram matrices of the per-sample mean tokens (U-REPA's
  sample-sample manifold loss; O(B^2) instead of O(B N^2)).
Everything alignment-related is computed in fp32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from losses.cosine_token_loss import cosine_token_loss
from losses.diffusion_target import noisy_and_target, prediction_type_name

PREDICTION_TYPES = ("v", "epsilon")


token_loss = cosine_token_loss  # L_token: mean over batch and tokens of 1 - cos(u, d)


def gram_of_mean_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B,N,D] -> [B,B] cosine similarities of the per-sample mean tokens."""
    agg = F.normalize(x.float().mean(dim=1), dim=-1, eps=1e-8)
    return agg @ agg.T


def manifold_loss(x: torch.Tensor, y: torch.Tensor, upper_only: bool = False) -> torch.Tensor:
    """MSE between the sample-sample Gram matrices of x and y ([B,N,D] each, N may differ).

    ``upper_only`` averages over the strict upper triangle (i < j) only: the diagonal is 1 on both sides
    and the matrix is symmetric, so this is the same signal without the B diagonal zeros diluting it.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"manifold_loss: batch sizes differ ({x.shape[0]} vs {y.shape[0]})")
    gx, gy = gram_of_mean_tokens(x), gram_of_mean_tokens(y)
    if upper_only:
        b = gx.shape[0]
        if b < 2:
            return gx.new_zeros(())
        iu = torch.triu_indices(b, b, offset=1, device=gx.device)
        return F.mse_loss(gx[iu[0], iu[1]], gy[iu[0], iu[1]])
    return F.mse_loss(gx, gy)


def alignment_loss(
    unet_tokens: Mapping[str, torch.Tensor],
    dino_tokens: Mapping[str, torch.Tensor],
    manifold_coeff: float = 3.0,
    upper_only: bool = False,
) -> dict[str, torch.Tensor]:
    """Token, manifold and combined alignment loss, each averaged over the aligned layers."""
    if not unet_tokens:
        raise ValueError("alignment_loss: no U-Net tokens (no align layers)")
    tok, man = [], []
    for layer, x in unet_tokens.items():
        if layer not in dino_tokens:
            raise KeyError(f"no DINO tokens for align layer {layer!r}; batch has {sorted(dino_tokens)}")
        y = dino_tokens[layer].to(x.device)
        tok.append(token_loss(x, y))
        man.append(
            manifold_loss(x, y, upper_only) if manifold_coeff != 0 else x.new_zeros((), dtype=torch.float32)
        )
    loss_token = torch.stack(tok).mean()
    loss_manifold = torch.stack(man).mean()
    return dict(
        loss_token=loss_token,
        loss_manifold=loss_manifold,
        loss_align=loss_token + manifold_coeff * loss_manifold,
    )


class URepaLoss(nn.Module):
    """Noises clean latents, runs the model, returns the U-REPA loss terms.

    ``model(x_t, t, encoder_hidden_states, return_tokens=...)`` must return ``(pred, {layer: tokens})``
    (:class:`models.sd15_unet_aligned.SD15UNetAligned`). With ``align_coeff == 0`` tokens are not requested,
    so no head runs and the alignment terms are reported as 0 (the baseline).
    """

    def __init__(
        self,
        noise_scheduler: Any,
        prediction: str = "v",
        align_coeff: float = 0.8,
        manifold_coeff: float = 3.0,
        manifold_upper_only: bool = False,
    ) -> None:
        super().__init__()
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {prediction!r}")
        if align_coeff < 0 or manifold_coeff < 0:
            raise ValueError(
                f"align_coeff ({align_coeff}) and manifold_coeff ({manifold_coeff}) must be >= 0"
            )
        self.noise_scheduler = noise_scheduler  # diffusers DDPMScheduler (its alphas_cumprod)
        self.prediction = prediction
        self.align_coeff = float(align_coeff)
        self.manifold_coeff = float(manifold_coeff)
        self.manifold_upper_only = manifold_upper_only

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    def forward(
        self,
        model: Any,
        latents: torch.Tensor,
        dino_tokens: Mapping[str, torch.Tensor],
        encoder_hidden_states: torch.Tensor,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        b = latents.shape[0]
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        if timesteps is None:
            timesteps = torch.randint(
                0, self.num_train_timesteps, (b,), generator=generator, device=latents.device
            )
        x_t, target = noisy_and_target(
            self.noise_scheduler,
            latents.float(),
            noise.float(),
            timesteps,
            prediction_type_name(self.prediction),
        )
        use_align = self.align_coeff > 0
        pred, tokens = model(x_t.to(latents.dtype), timesteps, encoder_hidden_states, return_tokens=use_align)
        loss_diff = F.mse_loss(pred.float(), target)
        if use_align:
            terms = alignment_loss(tokens, dino_tokens, self.manifold_coeff, self.manifold_upper_only)
        else:
            zero = loss_diff.new_zeros(())
            terms = dict(loss_token=zero, loss_manifold=zero, loss_align=zero)
        loss = loss_diff + self.align_coeff * terms["loss_align"] if use_align else loss_diff
        return dict(loss=loss, loss_diff=loss_diff, **terms)
