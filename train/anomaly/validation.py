"""Validation samples during training (PNG grid under <output_dir>/validation/ + TensorBoard)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from utils.images import save_image_grid
from utils.logging import get_logger

logger = get_logger(__name__)


def _log_images(accelerator, tag: str, images: torch.Tensor, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, ((images.clamp(-1, 1) + 1) / 2).cpu(), step, dataformats="NCHW")


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
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config),
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
        generator=gen,
        output_type="pt",
        height=args.resolution,
        width=args.resolution,
    ).images
    images = images * 2 - 1  # pipeline returns [0, 1]
    path = Path(args.output_dir) / "validation" / f"step-{step:06d}.png"
    save_image_grid(images, path, nrow=min(4, len(images)), value_range=(-1, 1))
    _log_images(accelerator, "validation", images, step)
    return path


@torch.no_grad()
def sample_dual(
    dual_unet: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    vae: nn.Module,
    noise_scheduler,
    prompt_blend: str,
    prompt_fg: str,
    num_images: int,
    steps: int,
    guidance_scale: float,
    resolution: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint DDIM sampling of both branches (interaction active) with classifier-free guidance."""
    from diffusers import DDIMScheduler

    from train.anomaly.components import encode_prompt, tokenize

    device = dual_unet.device
    sched = DDIMScheduler.from_config(noise_scheduler.config)
    sched.set_timesteps(steps, device=device)

    def emb(p: str) -> torch.Tensor:
        return encode_prompt(text_encoder, tokenize(tokenizer, p)).expand(num_images, -1, -1)

    e_blend, e_fg, e_null = emb(prompt_blend), emb(prompt_fg), emb("")
    shape = (num_images, 4, resolution // 8, resolution // 8)
    lat_b = torch.randn(shape, generator=generator).to(device) * sched.init_noise_sigma
    lat_f = torch.randn(shape, generator=generator).to(device) * sched.init_noise_sigma
    for t in sched.timesteps:
        cb, cf = dual_unet(
            torch.cat([lat_b, lat_b]),
            torch.cat([lat_f, lat_f]),
            t,
            torch.cat([e_null, e_blend]),
            torch.cat([e_null, e_fg]),
        )
        ub, tb = cb.chunk(2)
        uf, tf = cf.chunk(2)
        lat_b = sched.step(ub + guidance_scale * (tb - ub), t, lat_b).prev_sample
        lat_f = sched.step(uf + guidance_scale * (tf - uf), t, lat_f).prev_sample
    sf = vae.config.scaling_factor
    blend = vae.decode(lat_b.to(vae.dtype) / sf).sample.float().clamp(-1, 1)
    fg = vae.decode(lat_f.to(vae.dtype) / sf).sample.float().clamp(-1, 1)
    return blend, fg


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
    was_training = dual_unet.training
    dual_unet.eval()
    try:
        blend, fg = sample_dual(
            dual_unet,
            text_encoder,
            tokenizer,
            vae,
            noise_scheduler,
            args.instance_prompt_blend,
            args.instance_prompt_fg,
            args.num_validation_images,
            args.validation_inference_steps,
            2.5,
            args.resolution,
            torch.Generator().manual_seed(args.seed),
        )
    finally:
        dual_unet.train(was_training)
    images = torch.cat([blend, fg])
    path = Path(args.output_dir) / "validation" / f"step-{step:06d}.png"
    save_image_grid(images, path, nrow=len(blend), value_range=(-1, 1))
    _log_images(accelerator, "validation/blend_fg", images, step)
    return path
