"""Validation samples during training (PNG grid under <output_dir>/validation/ + every active tracker).

Sampler and guidance come from the flags (``--validation_scheduler``, ``--validation_inference_steps``,
``--validation_guidance_scale``); stage 2 samples with the generation code's sampler
(:func:`models.dual_sampling.sample_pairs`), sample ``i`` with seed ``--seed + i``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from train.core.trackers import log_images
from utils.images import save_image_grid
from utils.logging import get_logger

logger = get_logger(__name__)


def _log_images(accelerator, tag: str, images: torch.Tensor, step: int, nrow: int) -> None:
    log_images(accelerator, tag, (images.clamp(-1, 1) + 1) / 2, step, nrow=nrow)


@torch.no_grad()
def validate_stage1(
    accelerator,
    args,
    unet: nn.Module,
    text_encoder: nn.Module,
    vae: nn.Module,
    tokenizer,
    noise_scheduler,
    step: int,
) -> Path:
    from diffusers import StableDiffusionPipeline

    from models.schedulers import make_scheduler

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(args.validation_scheduler, noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(args.seed)
    images = pipe(
        args.validation_prompt,
        num_images_per_prompt=args.num_validation_images,
        num_inference_steps=args.validation_inference_steps,
        guidance_scale=args.validation_guidance_scale,
        generator=gen,
        output_type="pt",
        height=args.resolution,
        width=args.resolution,
    ).images
    images = images * 2 - 1  # pipeline returns [0, 1]
    path = Path(args.output_dir) / "validation" / f"step-{step:06d}.png"
    save_image_grid(images, path, nrow=min(4, len(images)), value_range=(-1, 1))
    _log_images(accelerator, "validation", images, step, nrow=min(4, len(images)))
    return path


@torch.no_grad()
def validate_stage2(
    accelerator,
    args,
    dual_unet: nn.Module,
    text_encoder: nn.Module,
    vae: nn.Module,
    tokenizer,
    noise_scheduler,
    step: int,
) -> Path:
    from models.dual_sampling import sample_pairs

    components = {
        "dual_unet": dual_unet,
        "vae": vae,
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "scheduler": noise_scheduler,
    }
    was_training = dual_unet.training
    dual_unet.eval()
    try:
        blend, fg = sample_pairs(
            components,
            args.instance_prompt_blend,
            args.instance_prompt_fg,
            [args.seed + i for i in range(args.num_validation_images)],
            scheduler=args.validation_scheduler,
            num_inference_steps=args.validation_inference_steps,
            guidance_scale=args.validation_guidance_scale,
            resolution=args.resolution,
        )
    finally:
        dual_unet.train(was_training)
    images = torch.cat([blend, fg])
    path = Path(args.output_dir) / "validation" / f"step-{step:06d}.png"
    save_image_grid(images, path, nrow=len(blend), value_range=(-1, 1))
    _log_images(accelerator, "validation/blend_fg", images, step, nrow=len(blend))
    return path
