"""The optional image losses of DinoVQ: LPIPS perceptual loss and the PatchGAN adversarial loss.

Held by ``DinoVQModel.loss_fn`` (the seed's attribute path: ``model.loss_fn.discriminator``).

Gradient isolation between the two updates is built in, not left to the caller's ``requires_grad`` toggling:
the generator pass evaluates the discriminator with *detached copies* of its parameters
(``torch.func.functional_call``), so gradients reach the generator through the fake images but never the
discriminator's parameters; the discriminator pass sees detached images, so nothing reaches the generator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from losses.patchgan import D_LOSSES, PatchGANDiscriminator, generator_adv_loss, resolve_gen_loss


class DinoVQLoss(nn.Module):
    def __init__(
        self,
        use_perceptual: bool = False,
        perceptual_weight: float = 1.0,
        perceptual_module: nn.Module | None = None,
        vgg_ckpt_path: str | None = None,
        use_gan: bool = False,
        disc_start: int = 10000,
        disc_weight: float = 0.5,
        disc_dim: int = 64,
        disc_num_layers: int = 3,
        disc_adaptive_weight: bool = True,
        disc_loss: str = "hinge",
        in_channels: int = 3,
        gen_loss: str | None = None,
    ):
        super().__init__()
        if disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        # "taming": -mean(D(x_rec)) whatever disc_loss is (taming's VQLPIPSWithDiscriminator);
        # "non_saturating": mean(softplus(-D(x_rec))); None: taming with hinge, non-saturating with vanilla.
        self.gen_loss_kind = resolve_gen_loss(disc_loss, gen_loss)
        if disc_start < 0:
            raise ValueError(f"disc_start must be >= 0, got {disc_start}")
        self.use_perceptual = use_perceptual
        self.perceptual_weight = perceptual_weight
        self.use_gan = use_gan
        self.disc_start = int(disc_start)
        self.disc_weight = float(disc_weight)
        self.disc_adaptive_weight = disc_adaptive_weight
        self.disc_loss_kind = disc_loss
        # The frozen LPIPS network is kept out of the module tree so that it is neither in state_dict
        # (checkpoints would carry 58 MB of VGG each) nor in .parameters(); ``_apply`` still moves it.
        self.__dict__["perceptual"] = None
        if use_perceptual:
            if perceptual_module is None:
                from losses.lpips_vgg import build_lpips_vgg

                perceptual_module = build_lpips_vgg(vgg_ckpt_path=vgg_ckpt_path)
            perceptual_module.eval().requires_grad_(False)
            self.__dict__["perceptual"] = perceptual_module
        self.discriminator = (
            PatchGANDiscriminator(in_channels=in_channels, disc_dim=disc_dim, disc_num_layers=disc_num_layers)
            if use_gan
            else None
        )

    def _apply(self, fn: Callable, *args, **kwargs):  # noqa: D401 - nn.Module hook for .to()/.cuda()/...
        super()._apply(fn, *args, **kwargs)
        if self.perceptual is not None:
            self.perceptual._apply(fn, *args, **kwargs)
        return self

    def perceptual_loss(self, reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance; both inputs in [-1, 1]."""
        return self.perceptual(reconstructions, images).mean()

    def disc_factor(self, global_step: int) -> float:
        """1 from ``disc_start`` on, 0 before (the warm-up during which adversarial terms are zero)."""
        return 1.0 if global_step >= self.disc_start else 0.0

    def generator_logits(self, fake: torch.Tensor) -> torch.Tensor:
        """Discriminator logits with its parameters detached: gradients reach ``fake`` only."""
        params = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        params.update(dict(self.discriminator.named_buffers()))
        return functional_call(self.discriminator, params, (fake,))

    def generator_loss(self, fake: torch.Tensor) -> torch.Tensor:
        return generator_adv_loss(
            self.generator_logits(fake).float(), self.disc_loss_kind, self.gen_loss_kind
        )

    def discriminator_loss(
        self, real: torch.Tensor, fake: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unweighted loss, logits_real, logits_fake) with both image batches detached."""
        logits_real = self.discriminator(real.detach()).float()
        logits_fake = self.discriminator(fake.detach()).float()
        return D_LOSSES[self.disc_loss_kind](logits_real, logits_fake), logits_real, logits_fake
