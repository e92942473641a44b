"""``DualAnoDiffPipeline``: stage-2 anomaly generation (image, fg, mask) in one call from Python.

    from models.dual_anodiff_pipeline import DualAnoDiffPipeline

    pipe = DualAnoDiffPipeline.from_pretrained("models/stable-diffusion-v1-5",
                                               "all_generate/hazelnut/stage2-hole-dual").to("cuda")
    out = pipe(num_images=4, preset="official", seed=0)   # DualAnoDiff's sampling: PNDM, 100 steps, 2.5
    out.images[0], out.fg_images[0], out.masks[0]      # PIL: anomalous image, its foreground, the mask

Sampling defaults come from ``preset``, as ``eval/generate.py --preset`` (the same table,
``models.dual_sampling.PRESETS``): ``"fast"`` (default, like the CLI) = DDIM, 50 steps, guidance 2.5; ``"official"`` =
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

Saving and loading (a self-contained diffusers folder)::

    pipe.save_pretrained("my_pipe")                                  # base components + the stage-2 weights
    pipe = DualAnoDiffPipeline.from_pretrained("my_pipe")
    pipe = DiffusionPipeline.from_pretrained("my_pipe", trust_remote_code=True)   # the folder's own code

``save_pretrained`` writes the base SD-1.5 components (``vae/``, ``text_encoder/`` without LoRA, ``tokenizer/``,
``scheduler/``, ``unet/`` = the base U-Net), the stage-2 weights beside the base U-Net (``unet/dual_config.json``,
``unet/dual_unet.safetensors``, ``unet/text_encoder_lora.safetensors``), a copy of this file and a
``model_index.json`` whose ``_class_name`` names it, so that diffusers' ``DiffusionPipeline.from_pretrained``
loads this class (``trust_remote_code=True``: it runs the folder's copy of this file, which imports this
repository's ``models``/``eval``/``utils``: run from the repository root or put it on ``PYTHONPATH``). The class's
``__init__`` then turns the plain U-Net loaded from ``unet/`` into the stage-2 model.

Background compensation (weights trained with ``--bcm``): pass ``backgrounds`` (the cut-out good images, e.g.
``datasets.bcm_background.background_image``); sample ``i`` uses ``backgrounds[(i // background_every) % n]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
        unet, text_encoder, weights_config = _attach_dual_weights(unet, text_encoder)
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )
        self.weights_config: dict = weights_config

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        weights_dir: str | os.PathLike | None = None,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> DualAnoDiffPipeline:
        """SD-1.5 base (local diffusers directory or a hub id in the local cache) + stage-2 weights directory,
        or (``weights_dir=None``) a folder written by :meth:`save_pretrained`.

        Nothing is downloaded: a missing base names the files and how to get them.
        """
        from models.dual_lora_io import DUAL_CONFIG_NAME, load_dual_unet

        if weights_dir is None:
            weights_dir = Path(pretrained_model_name_or_path) / SAVED_DUAL_SUBFOLDER
            if not (weights_dir / DUAL_CONFIG_NAME).is_file():
                raise FileNotFoundError(
                    f"{pretrained_model_name_or_path} is not a folder written by DualAnoDiffPipeline.save_pretrained "
                    f"(no {weights_dir / DUAL_CONFIG_NAME}); for an SD-1.5 base pass weights_dir= (a stage-2 "
                    "--output_dir or checkpoint-<step>/)"
                )
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

    def save_pretrained(
        self, save_directory: str | os.PathLike, safe_serialization: bool = True, **_: object
    ) -> None:
        """Write a self-contained folder that :meth:`from_pretrained` and ``DiffusionPipeline.from_pretrained(
        folder, trust_remote_code=True)`` load to this pipeline (module docstring). Written atomically."""
        import json
        import shutil

        import diffusers

        from models.dual_lora import DualLoRAUNet, _unwrap, save_dual_weights
        from utils.checkpoint import atomic_write

        dual = _unwrap(self.unet)
        if not isinstance(dual, DualLoRAUNet):
            raise TypeError(
                f"DualAnoDiffPipeline.unet must be the stage-2 DualLoRAUNet, got {type(dual).__name__}"
            )
        text_encoder, te_lora = _base_text_encoder(self.text_encoder)
        with atomic_write(Path(save_directory)) as tmp:
            tmp.mkdir(parents=True)
            self.vae.save_pretrained(tmp / "vae", safe_serialization=safe_serialization)
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            self.scheduler.save_pretrained(tmp / "scheduler")
            _base_unet(dual).save_pretrained(tmp / "unet", safe_serialization=safe_serialization)
            text_encoder.save_pretrained(tmp / "text_encoder")  # transformers writes safetensors
            own = set(dual.config_dict()) | {"text_encoder_lora", "text_encoder_rank"}
            extra = {k: v for k, v in self.weights_config.items() if k not in own}
            save_dual_weights(
                dual, self.text_encoder if te_lora else None, tmp / SAVED_DUAL_SUBFOLDER, extra=extra
            )
            shutil.copyfile(Path(__file__), tmp / f"{PIPELINE_MODULE}.py")
            index = {
                "_class_name": [PIPELINE_MODULE, type(self).__name__],
                "_diffusers_version": diffusers.__version__,
                "scheduler": ["diffusers", type(self.scheduler).__name__],
                "text_encoder": ["transformers", type(text_encoder).__name__],
                "tokenizer": ["transformers", type(self.tokenizer).__name__],
                "unet": ["diffusers", type(dual.unet).__name__],
                "vae": ["diffusers", type(self.vae).__name__],
            }
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))

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
        backgrounds: list[Image.Image] | None = None,
        background_every: int = 50,
    ) -> DualAnoDiffPipelineOutput:
        """Generate ``num_images`` (image, fg, mask) triplets; sample ``i`` is drawn with seed ``seed + i``.

        ``preset``: ``"fast"`` (DDIM, 50, 2.5) or ``"official"`` (DualAnoDiff: PNDM, 100, 2.5) fills ``sampler``,
        ``num_inference_steps`` and ``guidance_scale`` where they are None (``eval/generate.py --preset``).
        ``sampler`` as ``eval/generate.py --scheduler``; ``guidance_scale`` on both branches (1 = off);
        ``output_type``: ``"pil"`` (PIL images, masks as "L" images) or ``"pt"`` (``[N,3,H,W]`` tensors in
        [-1, 1], masks as boolean arrays).
        """
        from models.dual_lora_io import LEGACY_FG_BACKGROUND
        from models.dual_sampling import BCM_DEFAULT_GUIDANCE, BCM_REFERENCE_GUIDANCE, PRESETS, sample_pairs
        from models.mask_extraction import MaskParams, extract_mask, mask_to_image
        from utils.images import to_pil

        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        defaults = PRESETS[preset]
        sampler = defaults["scheduler"] if sampler is None else sampler
        num_inference_steps = (
            defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        )
        if guidance_scale is None:  # official_bcm: the BCM script's per-class value
            class_name = self.weights_config.get("mvtec_name", "")
            guidance_scale = defaults.get(
                "guidance_scale", BCM_REFERENCE_GUIDANCE.get(class_name, BCM_DEFAULT_GUIDANCE)
            )
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
        from models.bcm_reference_attention import BCMDualLoRAUNet, sampling_condition

        bg_tensors = []
        if isinstance(self.unet, BCMDualLoRAUNet):
            if not backgrounds:
                raise ValueError(
                    "these stage-2 weights use background compensation (--bcm): pass backgrounds= (good images "
                    "with their object removed, e.g. datasets.bcm_background.background_image(image, fg_mask))"
                )
            size = resolution or self.unet.config.sample_size * 2 ** (
                len(self.vae.config.block_out_channels) - 1
            )
            bg_tensors = [
                torch.from_numpy(np.array(b.convert("RGB").resize((size, size), Image.BILINEAR))).permute(
                    2, 0, 1
                )
                for b in backgrounds
            ]
        blends, fgs = [], []
        for start in self.progress_bar(range(0, num_images, batch_size)):
            indices = list(range(start, min(start + batch_size, num_images)))
            seeds = [seed + i for i in indices]
            condition = sampling_condition(
                components, bg_tensors, indices, seeds, guidance_scale > 1.0, background_every
            )
            with condition:
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


SAVED_DUAL_SUBFOLDER = "unet"  # save_pretrained: the stage-2 weights beside the base U-Net they apply to
PIPELINE_MODULE = "dual_anodiff_pipeline"


def _attach_dual_weights(unet, text_encoder):
    """(unet, text_encoder, weights config) for ``__init__``: a stage-2 model passes through; a plain U-Net
    loaded by ``DiffusionPipeline.from_pretrained`` from a :meth:`DualAnoDiffPipeline.save_pretrained` folder
    (its ``unet/`` holds ``dual_config.json``) becomes the stage-2 model of those weights."""
    from models.dual_lora import (
        DUAL_CONFIG_NAME,
        DualLoRAUNet,
        add_text_encoder_lora,
        dual_unet_from_config,
        load_dual_weights,
        read_dual_config,
    )

    if isinstance(unet, DualLoRAUNet):
        return unet, text_encoder, {}
    folder = Path(getattr(getattr(unet, "config", None), "_name_or_path", "") or "")
    if (
        not (folder / DUAL_CONFIG_NAME).is_file()
        and (folder / SAVED_DUAL_SUBFOLDER / DUAL_CONFIG_NAME).is_file()
    ):
        folder = folder / SAVED_DUAL_SUBFOLDER  # loaded as (root, subfolder="unet")
    if not (folder / DUAL_CONFIG_NAME).is_file():
        raise ValueError(
            "DualAnoDiffPipeline needs the stage-2 dual U-Net: build it with DualAnoDiffPipeline.from_pretrained("
            "base, weights_dir) or load a folder written by DualAnoDiffPipeline.save_pretrained (its unet/ holds "
            f"{DUAL_CONFIG_NAME}); got a plain {type(unet).__name__}"
        )
    config = read_dual_config(folder)
    dtype, device = unet.dtype, unet.device
    dual = dual_unet_from_config(unet, config)
    if config.get("text_encoder_lora"):
        add_text_encoder_lora(text_encoder, rank=int(config["text_encoder_rank"]))
    load_dual_weights(dual, text_encoder, folder)
    dual.to(device=device, dtype=dtype).eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return dual, text_encoder, config


def _base_unet(dual):
    """A plain diffusers U-Net with ``dual``'s frozen base weights (LoRA sets and added modules left out)."""
    from diffusers import UNet2DConditionModel

    state = {}
    for k, v in dual.unet.state_dict().items():
        if ".lora_A." in k or ".lora_B." in k:
            continue
        state[k.replace(".base.", ".")] = v
    unet = UNet2DConditionModel.from_config(dual.unet.config)
    unet.load_state_dict(state, strict=True)
    return unet.to(dual.unet.dtype)


def _base_text_encoder(text_encoder):
    """(text encoder without its peft LoRA layers, whether it had them)."""
    state = text_encoder.state_dict()
    if not any("lora_" in k for k in state):
        return text_encoder, False
    base = type(text_encoder)(text_encoder.config)
    clean = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}
    base.load_state_dict(clean, strict=True)
    return base.to(text_encoder.dtype), True
