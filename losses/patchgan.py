"""PatchGAN discriminator and the VQGAN adversarial-loss helpers (Esser et al. 2021, taming-transformers).

* ``PatchGANDiscriminator``: the pix2pix N-layer PatchGAN (4x4 convs, stride 2 then 1, LeakyReLU 0.2), one logit
  per overlapping patch. Normalisation is GroupNorm instead of taming's BatchNorm: the generator pass also
  runs the discriminator, and BatchNorm would update its running statistics there (state leaking from the
  generator update into the discriminator) and would need SyncBatchNorm under DDP.
* ``hinge_d_loss`` / ``vanilla_d_loss``: discriminator losses; ``generator_adv_loss``: ``gen_loss="taming"``
  is ``-mean(logits_fake)``, what taming's ``VQLPIPSWithDiscriminator`` uses with *both* discriminator losses;
  ``gen_loss="non_saturating"`` is ``mean(softplus(-logits_fake))``, the generator loss that matches the
  vanilla (logistic) discriminator loss (Goodfellow et al.'s non-saturating form). Default (``None``): taming's
  form with ``hinge``, the non-saturating form with ``vanilla``.
* ``calculate_adaptive_weight``: ``||grad_W L_rec|| / (||grad_W L_adv|| + 1e-4)`` at the decoder's last layer
  ``W``, clamped to ``[0, 1e4]``, detached, times ``disc_weight`` (taming ``VQLPIPSWithDiscriminator``).
* ``adopt_weight``: ``weight`` once ``global_step >= threshold`` else ``value`` (the ``disc_start`` warm-up).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchGANDiscriminator(nn.Module):
    """N-layer PatchGAN: ``disc_dim`` base channels, ``disc_num_layers`` stride-2 stages (channel mult <= 8)."""

    def __init__(self, in_channels: int = 3, disc_dim: int = 64, disc_num_layers: int = 3):
        super().__init__()
        if disc_num_layers < 1:
            raise ValueError(f"disc_num_layers must be >= 1, got {disc_num_layers}")
        if disc_dim < 1:
            raise ValueError(f"disc_dim must be >= 1, got {disc_dim}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, disc_dim, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, disc_num_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(disc_dim * prev, disc_dim * mult, 4, stride=2, padding=1, bias=False),
                _norm(disc_dim * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        prev, mult = mult, min(2**disc_num_layers, 8)
        layers += [
            nn.Conv2d(disc_dim * prev, disc_dim * mult, 4, stride=1, padding=1, bias=False),
            _norm(disc_dim * mult),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(disc_dim * mult, 1, 4, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    # pix2pix / taming initialisation
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


G_LOSSES = ("taming", "non_saturating")


def resolve_gen_loss(kind: str, gen_loss: str | None = None) -> str:
    """The generator loss form for discriminator loss ``kind`` (``gen_loss=None``: hinge -> taming,
    vanilla -> non_saturating)."""
    if kind not in D_LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r}; choose one of {sorted(D_LOSSES)}")
    if gen_loss is None:
        return "taming" if kind == "hinge" else "non_saturating"
    if gen_loss not in G_LOSSES:
        raise ValueError(f"unknown generator loss {gen_loss!r}; choose one of {list(G_LOSSES)} (or None)")
    return gen_loss


def generator_adv_loss(
    logits_fake: torch.Tensor, kind: str = "hinge", gen_loss: str | None = None
) -> torch.Tensor:
    """Generator adversarial loss: ``-mean(logits)`` (taming) or ``mean(softplus(-logits))`` (non-saturating)."""
    if resolve_gen_loss(kind, gen_loss) == "taming":
        return -logits_fake.mean()
    return F.softplus(-logits_fake).mean()


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    return weight if global_step >= threshold else value


def calculate_adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    disc_weight: float,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """Adaptive generator weight (detached scalar); both losses must depend on ``last_layer``."""
    rec_grads = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(rec_grads.float()) / (torch.norm(g_grads.float()) + 1e-4)
    return torch.clamp(d_weight, 0.0, max_weight).detach() * disc_weight
