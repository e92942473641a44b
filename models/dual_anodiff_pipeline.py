"""``DualAnoDiffPipeline``: stage-2 anomaly generation (image, fg, mask) in one call from Python.

    from models.dual_anodiff_pipeline import DualAnoDiffPipeline

    pipe = DualAnoDiffPipeline.from_pretrained("models/stable-diffusion-v1-5",
                                               "all_generate/hazelnut/stage2-hole-dual").to("cuda")
    out = pipe(num_images=4, preset="official", seed=0)   # DualAnoDiff's sampling: PNDM, 100 steps, 2.5
    out.images[0], out.fg_images[0], out.masks[0]      # PIL: anomalous image, its foreground, the mask

Sampling defaults come from ``preset``, as ``eval/generate.py --preset`` (the same table,
``eval.generate.PRESETS``): ``"fast"`` (default, like the CLI) = DDIM, 50 steps, guidance 2.5; ``"official"`` =
DualAnoDiff's inference (the stock SD-1.5 pipeline's PNDM, 100 steps, guidance 2.5). ``sampler``,
``num_inference_steps`` and ``guidance_scale`` given explicitly override the preset. Prompts default to the
reference's ("a vfx with sks" / "sks", unconditional "").

A diffusers ``DiffusionPipeline`` whose ``unet`` is the stage-2 :class:`models.dual_lora.DualLoRAUNet`:
both branches are denoised jointly with the interaction modules active, exactly as ``eval/generate.py
stage2`` does (the same sampler code, ``models.dual_sampling.sample_pairs``; sample ``i`` uses seed
``seed + i``, so the pipeline and the CLI give the same images), and the mask is extracted from the fg image
with ``models/mask_extraction.py``. ``weights_dir`` is a stage-2 ``--output_dir`` or ``checkpoint-<step>/``.
For a stock ``StableDiffusionPipeline`` (one branch, no interaction) use the per-branch LoRA files instead
(``models.dual_lora_io.export_branch_loras``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image


@dataclass
class DualAnoDiffPipelineOutput(BaseOutput):
    """``images``: blend-branch (anomalous) images; ``fg_images``: fg-branch images; ``masks``: defect masks
    (PIL "L" images with 0/255, or boolean ``[H,W]`` arrays with ``output_type="np"``)."""

    images: list[Image.Image] | torch.Tensor
    fg_images: list[Image.Image] | torch.Tensor
    masks: list[Image.Image] | list[np.ndarray]


class DualAnoDiffPipeline(DiffusionPipeline):
    """Joint (blend, fg) sampling with the stage-2 dual LoRA U-Net; see the module docstring."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler) -> None:
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )
        self.weights_config: dict = {}

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        weights_dir: str | os.PathLike,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> DualAnoDiffPipeline:
        """SD-1.5 base (local diffusers directory or a hub id in the local cache) + stage-2 weights directory.

        Nothing is downloaded: a missing base names the files and how to get them.
        """
        from models.dual_lora_io import load_dual_unet

        comps = load_dual_unet(pretrained_model_name_or_path, weights_dir, device=device, dtype=torch_dtype)
        pipe = cls(
            vae=comps["vae"],
            text_encoder=comps["text_encoder"],
            tokenizer=comps["tokenizer"],
            unet=comps["dual_unet"],
            scheduler=comps["scheduler"],
        )
        pipe.weights_config = comps["config"]
        return pipe

    @torch.no_grad()
    def __call__(
        self,
        num_images: int = 1,
        prompt_blend: str = "a vfx with sks",
        prompt_fg: str = "sks",
        negative_prompt: str = "",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int = 0,
        resolution: int | None = None,
        batch_size: int = 4,
        mask_params=None,
        output_type: str = "pil",
        preset: str = "fast",
    ) -> DualAnoDiffPipelineOutput:
        """Generate ``num_images`` (image, fg, mask) triplets; sample ``i`` is drawn with seed ``seed + i``.

        ``preset``: ``"fast"`` (DDIM, 50, 2.5) or ``"official"`` (DualAnoDiff: PNDM, 100, 2.5) fills ``sampler``,
        ``num_inference_steps`` and ``guidance_scale`` where they are None (``eval/generate.py --preset``).
        ``sampler`` as ``eval/generate.py --scheduler``; ``guidance_scale`` on both branches (1 = off);
        ``output_type``: ``"pil"`` (PIL images, masks as "L" images) or ``"pt"`` (``[N,3,H,W]`` tensors in
        [-1, 1], masks as boolean arrays).
        """
        from models.dual_lora_io import LEGACY_FG_BACKGROUND
        from models.dual_sampling import PRESETS, sample_pairs
        from models.mask_extraction import MaskParams, extract_mask, mask_to_image
        from utils.images import to_pil

        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        defaults = PRESETS[preset]
        sampler = defaults["scheduler"] if sampler is None else sampler
        num_inference_steps = (
            defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        )
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        if num_images < 1 or batch_size < 1:
            raise ValueError("num_images and batch_size must be >= 1")
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")

        # the fg background the weights were trained with (grey by default; older weights: black)
        background = self.weights_config.get("fg_background", LEGACY_FG_BACKGROUND)
        params = mask_params if mask_params is not None else MaskParams(background=background)
        components = {
            "dual_unet": self.unet,
            "vae": self.vae,
            "tokenizer": self.tokenizer,
            "text_encoder": self.text_encoder,
            "scheduler": self.scheduler,
        }
        blends, fgs = [], []
        for start in self.progress_bar(range(0, num_images, batch_size)):
            seeds = [seed + i for i in range(start, min(start + batch_size, num_images))]
            blend, fg = sample_pairs(
                components,
                prompt_blend=prompt_blend,
                prompt_fg=prompt_fg,
                seeds=seeds,
                scheduler=sampler,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                negative_prompt=negative_prompt,
                resolution=resolution,
            )
            blends.append(blend.cpu())
            fgs.append(fg.cpu())
        blend, fg = torch.cat(blends), torch.cat(fgs)
        fg_pil = [to_pil(x, (-1.0, 1.0)) for x in fg]
        masks = [extract_mask(img, params) for img in fg_pil]  # from the saved-PNG quantisation, as the CLI
        if output_type == "pt":
            return DualAnoDiffPipelineOutput(images=blend, fg_images=fg, masks=masks)
        return DualAnoDiffPipelineOutput(
            images=[to_pil(x, (-1.0, 1.0)) for x in blend],
            fg_images=fg_pil,
            masks=[mask_to_image(m) for m in masks],
        )
