"""The stage-2 sampler: (blend, fg) pairs denoised jointly by the dual LoRA U-Net.

One implementation for every caller: ``eval/generate.py stage2`` (CLI), ``DualAnoDiffPipeline``
(models/dual_anodiff_pipeline.py) and the stage-2 trainer's validation (train/anomaly/validation.py). Sample
``s`` depends only on its seed, so they all draw the same images from the same weights, seeds and flags.
"""

from __future__ import annotations

import torch

from models.schedulers import make_scheduler, step_kwargs

# What each sampling preset sets when not given (eval/generate.py --preset, DualAnoDiffPipeline(preset=)).
# "official": DualAnoDiff's inference script (the stock StableDiffusionPipeline's PNDM, 100 steps, guidance 2.5).
PRESETS = {
    "fast": {"scheduler": "ddim", "num_inference_steps": 50, "guidance_scale": 2.5},
    "official": {"scheduler": "pndm", "num_inference_steps": 100, "guidance_scale": 2.5},
    # DualAnoDiff's BCM inference (inference_test_tempt.py): 50 steps, guidance 2.0 (screw 1.2: see below)
    "official_bcm": {"scheduler": "pndm", "num_inference_steps": 50},
}
# The BCM script's per-class guidance (its only exception) and its value for every other class.
BCM_REFERENCE_GUIDANCE = {"screw": 1.2}
BCM_DEFAULT_GUIDANCE = 2.0


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids)[0]


@torch.no_grad()
def sample_pairs(
    components: dict,
    prompt_blend: str,
    prompt_fg: str,
    seeds: list[int],
    scheduler: str = "ddim",
    num_inference_steps: int = 50,
    guidance_scale: float = 2.5,
    negative_prompt: str = "",
    resolution: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint denoising of (blend, fg) pairs; returns both decoded batches in [-1, 1], fp32.

    The stage-2 sampler of generation and of the trainers' validation. ``components``: ``dual_unet``,
    ``vae``, ``tokenizer``, ``text_encoder`` and ``scheduler`` (the model's noise scheduler, whose config
    :func:`models.schedulers.make_scheduler` turns into the sampler ``scheduler``). As DualAnoDiff's
    pipeline: the initial noise of sample ``s`` is one draw of shape ``[2, C, h, w]`` (blend, fg) from a
    generator seeded with ``s``; guidance runs the unconditional and the conditional pairs in one batch
    (``uncond + w * (cond - uncond)`` per branch); one scheduler steps both branches.
    """
    dual, vae = components["dual_unet"], components["vae"]
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    device, dtype = dual.device, dual.dtype
    b = len(seeds)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    size = resolution or dual.config.sample_size * scale
    if size % scale:
        raise ValueError(f"--resolution must be a multiple of {scale}, got {size}")
    shape = (2, dual.config.in_channels, size // scale, size // scale)
    # per-sample generators: a sample does not depend on its batch mates (nor on the process that draws it)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    noise = [torch.randn(shape, generator=g) for g in gens]
    sched = make_scheduler(scheduler, components["scheduler"].config)
    sched.set_timesteps(num_inference_steps, device=device)
    # [blend of every sample; fg of every sample]
    latents = torch.cat([torch.stack([n[0] for n in noise]), torch.stack([n[1] for n in noise])])
    latents = (latents * sched.init_noise_sigma).to(device, dtype)
    emb_b = encode_prompts(tokenizer, text_encoder, [prompt_blend], device).to(dtype).expand(b, -1, -1)
    emb_f = encode_prompts(tokenizer, text_encoder, [prompt_fg], device).to(dtype).expand(b, -1, -1)
    use_cfg = guidance_scale > 1.0
    if use_cfg:
        emb_u = encode_prompts(tokenizer, text_encoder, [negative_prompt], device).to(dtype).expand(b, -1, -1)
        emb_b, emb_f = torch.cat([emb_u, emb_b]), torch.cat([emb_u, emb_f])
    for t in sched.timesteps:
        x_b, x_f = sched.scale_model_input(latents, t).chunk(2)
        if use_cfg:
            x_b, x_f = torch.cat([x_b, x_b]), torch.cat([x_f, x_f])
        pred_b, pred_f = dual(x_b, x_f, t, emb_b, emb_f)
        if use_cfg:
            u, c = pred_b.chunk(2)
            pred_b = u + guidance_scale * (c - u)
            u, c = pred_f.chunk(2)
            pred_f = u + guidance_scale * (c - u)
        # stochastic samplers (ddpm) draw each row's step noise from its sample's generator, not the global RNG
        step = sched.step(torch.cat([pred_b, pred_f]), t, latents, **step_kwargs(sched, gens + gens))
        latents = step.prev_sample
    images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    img_b, img_f = images.float().clamp(-1, 1).chunk(2)
    return img_b, img_f
