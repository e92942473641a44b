"""DualAnoDiff's background compensation (BCM): reference-only self-attention from a background condition.

The paper's third component (``bcm-dual-interrelated_diff/`` in the official code). Each denoising call of the
dual model becomes two U-Net passes:

1. **write**: the background condition (the image with its object's foreground removed, VAE-encoded WITHOUT the
   latent scaling factor, noised to the pair's timestep by the DDPM noise schedule) runs through the U-Net with
   the blend branch's LoRA set and the blend prompt, no branch interaction. The input of every self-attention
   layer (``attn1``, after the block's norm) is stored per layer (the reference's ``ReferenceOnlyAttnProc`` in
   mode "w").
2. **read**: the usual dual pass ``[blend; fg]``; in every self-attention layer the blend half's keys/values are
   computed from ``(1 - a) * h + a * mlp(ref)`` instead of ``h`` (``h`` = the blend tokens, ``ref`` = the stored
   write-pass tokens of the same layer, ``mlp`` = Linear(C, 320) -> Linear(320, C) without activation, ``a`` a
   learnt scalar starting at 0); the queries and the fg half are unchanged. Cross-attention is unchanged.

With ``a = 0`` (a fresh model) the read pass is exactly the dual model's forward. The official processor's
names map as ``temporal_condition_mlp.{0,1}`` -> ``compensations.<layer>.condition_mlp.{0,1}`` and
``temporal_a`` -> ``compensations.<layer>.mix`` (see ``preprocessing/convert_official_dualanodiff.py``).

Classifier-free guidance, as the reference's inference: the batch is ``[uncond pairs; cond pairs]`` and the
condition batch ``[negative; background]``, ``negative`` = the latent of an all-zero (mid-grey) image, each
written with that half's blend prompt (the unconditional prompt for the first half). Its condition noise is a
fresh draw at every U-Net call. :class:`BackgroundCondition` does this for the samplers: it is installed with
:meth:`BCMDualLoRAUNet.conditioned` around an unchanged sampler loop (``eval.generate.sample_pairs``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from models.dual_lora import DualLoRAUNet

BCM_MLP_HIDDEN = 320  # the reference's temporal_condition_mlp width (fixed, whatever the layer width)
BCM_CONFIG_KEY = "background_compensation"


class BackgroundCompensation(nn.Module):
    """One self-attention layer's condition path: ``(1 - mix) * hidden + mix * condition_mlp(reference)``."""

    def __init__(self, dim: int, hidden: int = BCM_MLP_HIDDEN):
        super().__init__()
        self.condition_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Linear(hidden, dim))
        self.mix = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        dtype = self.mix.dtype
        ref = self.condition_mlp(reference.to(dtype))
        return ((1 - self.mix) * hidden.to(dtype) + self.mix * ref).to(hidden.dtype)


class BCMDualLoRAUNet(DualLoRAUNet):
    """:class:`models.dual_lora.DualLoRAUNet` (interrelated mode) + background compensation.

    ``forward(..., condition=noisy_condition_latents)`` runs the write and the read pass (module docstring);
    without ``condition`` the one installed by :meth:`conditioned` is used, and without either it is an error.
    ``forward_branch`` is the plain single-branch pass (no condition). Gradient checkpointing is refused: its
    recomputation would replay the write pass with the read pass's routing.
    """

    def __init__(self, unet: nn.Module, rank: int, bcm_mlp_hidden: int = BCM_MLP_HIDDEN, **kwargs: Any):
        super().__init__(unet, rank, **kwargs)
        if self.dual_mode != "interrelated":
            raise ValueError("background compensation needs dual_mode='interrelated' (the reference's model)")
        self.bcm_mlp_hidden = int(bcm_mlp_hidden)
        self.compensations = nn.ModuleDict()
        self.reference_attention_names = [n for n in self.attention_names if n.rsplit(".", 1)[-1] == "attn1"]
        if not self.reference_attention_names:
            raise ValueError("background compensation: the U-Net has no self-attention (attn1) layers")
        self._mode: str | None = None
        self._references: dict[str, torch.Tensor] = {}
        self._condition_source: BackgroundCondition | None = None
        for name in self.reference_attention_names:
            attn = unet.get_submodule(name)
            if attn.is_cross_attention:
                raise ValueError(f"{name} is a cross-attention layer; BCM reads self-attention layers only")
            key = name.replace(".", "__")
            module = BackgroundCompensation(attn.to_q.in_features, self.bcm_mlp_hidden)
            self.compensations[key] = module.to(device=attn.to_q.weight.device)
            self._hooks.append(attn.register_forward_pre_hook(self._make_pre_hook(key), with_kwargs=True))

    def _make_pre_hook(self, key: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict):
            if self._mode is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if kwargs.get("encoder_hidden_states") is not None:
                raise RuntimeError(
                    f"BCM: self-attention {key} got encoder_hidden_states (only_cross_attention?)"
                )
            if self._mode == "write":
                self._references[key] = hidden
                return None
            blend, fg = hidden.chunk(2, dim=0)
            reference = self._references[key]
            if reference.shape != blend.shape:
                raise RuntimeError(
                    f"BCM: condition tokens {tuple(reference.shape)} do not match the blend half {tuple(blend.shape)}"
                )
            kwargs = dict(kwargs)
            kwargs["encoder_hidden_states"] = torch.cat([self.compensations[key](blend, reference), fg])
            return args, kwargs

        return hook

    @contextlib.contextmanager
    def conditioned(self, source: BackgroundCondition) -> Iterator[BCMDualLoRAUNet]:
        """Use ``source`` for every forward call without an explicit ``condition`` (sampler loops)."""
        previous, self._condition_source = self._condition_source, source
        try:
            yield self
        finally:
            self._condition_source = previous

    def forward(
        self,
        sample_blend: torch.Tensor,
        sample_fg: torch.Tensor,
        timestep: torch.Tensor | int | float,
        ehs_blend: torch.Tensor,
        ehs_fg: torch.Tensor,
        condition: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``condition``: noisy condition latents ``[B, C, h, w]`` (B = the blend batch), i.e.
        :func:`noised_condition` of the background latents at this call's timestep."""
        b = sample_blend.shape[0]
        t = torch.as_tensor(timestep, device=sample_blend.device)
        t = t.expand(b) if t.ndim == 0 else t
        if condition is None:
            if self._condition_source is None:
                raise ValueError(
                    "this stage-2 model was trained with background compensation (BCM): it needs a background "
                    "condition (forward(..., condition=...) or `with model.conditioned(BackgroundCondition(...))`)"
                )
            condition = self._condition_source(t, b)
        if condition.shape[0] != b or condition.shape[1:] != sample_blend.shape[1:]:
            raise ValueError(
                f"condition latents {tuple(condition.shape)} do not match the blend samples {tuple(sample_blend.shape)}"
            )
        if (
            self.training
            and torch.is_grad_enabled()
            and getattr(self.unet, "is_gradient_checkpointing", False)
        ):
            raise RuntimeError("background compensation does not support gradient checkpointing")
        try:
            self._references = {}
            self._mode = "write"
            self.forward_branch(condition.to(sample_blend.dtype), t, ehs_blend, "blend")
            self._mode = "read"
            return super().forward(sample_blend, sample_fg, t, ehs_blend, ehs_fg)
        finally:
            self._mode = None
            self._references = {}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        sd = super().trainable_state_dict()
        for key, module in self.compensations.items():
            for pname, p in module.state_dict().items():
                sd[f"compensations.{key}.{pname}"] = p
        return sd

    def config_dict(self) -> dict[str, Any]:
        config = super().config_dict()
        config[BCM_CONFIG_KEY] = True
        config["bcm_mlp_hidden"] = self.bcm_mlp_hidden
        return config


def noised_condition(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """The reference's ``add_noise`` of the condition latents at ``timestep`` with the (DDPM) noise schedule
    (its ``scale_model_input`` is the identity for DDPM). ``timestep``: one entry per latent."""
    t = timestep.to(latents.device)
    if t.is_floating_point():
        t = t.round()
    return scheduler.add_noise(latents, noise.to(latents.device, latents.dtype), t.long())


@torch.no_grad()
def encode_condition(vae: nn.Module, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[-1, 1] pixels -> posterior-sample latents, NOT multiplied by the VAE scaling factor (as the reference:
    ``vae.encode(condition).latent_dist.sample()``)."""
    dist = vae.encode(pixels.to(vae.dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32)
    return dist.mean + dist.std * noise.to(dist.mean.device, dist.mean.dtype)


class BackgroundCondition:
    """The condition of a sampler batch: per-sample background latents, their unconditional partner and a noise
    generator per sample (a fresh condition-noise draw at every U-Net call, as the reference).

    ``backgrounds``: ``[b, C, h, w]`` unscaled latents (:func:`encode_condition`); ``negatives``: the latents of
    the all-zero image for the guidance batch (None without guidance); ``generators``: one per sample.
    Called with the U-Net call's timestep and blend batch size, returns the noisy condition
    ``[negatives; backgrounds]`` (guidance) or ``backgrounds``.
    """

    def __init__(
        self,
        scheduler,
        backgrounds: torch.Tensor,
        negatives: torch.Tensor | None,
        generators: Sequence[torch.Generator],
    ):
        if len(generators) != backgrounds.shape[0]:
            raise ValueError(f"{len(generators)} generators for {backgrounds.shape[0]} backgrounds")
        if negatives is not None and negatives.shape != backgrounds.shape:
            raise ValueError(f"negatives {tuple(negatives.shape)} vs backgrounds {tuple(backgrounds.shape)}")
        self.scheduler = scheduler
        self.backgrounds = backgrounds
        self.negatives = negatives
        self.generators = list(generators)

    def __call__(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        rows = 1 if self.negatives is None else 2
        if batch != rows * self.backgrounds.shape[0]:
            raise ValueError(
                f"background condition for {self.backgrounds.shape[0]} samples x {rows} does not fit a U-Net "
                f"batch of {batch} (guidance on/off must match how the condition was built)"
            )
        shape = (rows, *self.backgrounds.shape[1:])
        draws = [torch.randn(shape, generator=g, dtype=torch.float32) for g in self.generators]
        noise = torch.cat([torch.stack([d[r] for d in draws]) for r in range(rows)])
        latents = (
            self.backgrounds if self.negatives is None else torch.cat([self.negatives, self.backgrounds])
        )
        return noised_condition(self.scheduler, latents, noise, timestep)


@torch.no_grad()
def background_condition_for_sampling(
    vae: nn.Module,
    scheduler,
    background_pixels: torch.Tensor,
    seeds: Sequence[int],
    guidance: bool,
) -> BackgroundCondition:
    """:class:`BackgroundCondition` of a sampler batch: ``background_pixels`` ``[b, 3, H, W]`` in [-1, 1]
    (one per sample), sample ``i``'s posterior samples and condition noise drawn from a generator seeded with
    ``seeds[i]`` offset by ``2**40`` (a stream apart from the initial-noise generator of ``seeds[i]``)."""
    gens = [torch.Generator().manual_seed(int(s) + (1 << 40)) for s in seeds]
    device = next(vae.parameters()).device
    pixels = background_pixels.to(device)
    backgrounds = torch.cat([encode_condition(vae, pixels[i : i + 1], g) for i, g in enumerate(gens)])
    negatives = None
    if guidance:
        zeros = torch.zeros_like(pixels[:1])
        negatives = torch.cat([encode_condition(vae, zeros, g) for g in gens])
    return BackgroundCondition(scheduler, backgrounds, negatives, gens)


def sampling_condition(
    components: dict,
    backgrounds: Sequence[torch.Tensor],
    sample_indices: Sequence[int],
    seeds: Sequence[int],
    guidance: bool,
    every: int,
) -> contextlib.AbstractContextManager:
    """The condition to install around one sampler batch of a BCM model (a no-op for other models).

    ``backgrounds``: uint8 ``[3, H, W]`` images (``datasets.bcm_background.load_good_backgrounds``); sample
    ``i`` uses background ``(i // every) % len(backgrounds)`` (the reference's rotation).
    """
    model = components["dual_unet"]
    if not isinstance(model, BCMDualLoRAUNet):
        return contextlib.nullcontext()
    from datasets.bcm_background import background_index

    if not backgrounds:
        raise ValueError("a background-compensation model needs backgrounds to sample from")
    picks = [backgrounds[background_index(i, len(backgrounds), every)] for i in sample_indices]
    pixels = torch.stack(picks).float() / 127.5 - 1.0
    source = background_condition_for_sampling(
        components["vae"], components["scheduler"], pixels, seeds, guidance
    )
    return model.conditioned(source)
