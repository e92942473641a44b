"""SD-1.5 components, prompt encoding and the stage-1 LoRA in diffusers format (load/save)."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.dual_lora import LORA_TARGETS
from models.dual_lora_io import add_text_encoder_lora, load_text_encoder_lora, normalize_lora_keys
from utils.weights import MissingWeightsError, resolve_hf_path, sd15_how_to_get

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
SD15_HOW_TO_GET = sd15_how_to_get()


@dataclass
class SDComponents:
    tokenizer: Any
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: Any
    root: Path


def load_sd_components(name_or_path: str | os.PathLike) -> SDComponents:
    """Tokenizer, text encoder, VAE, U-Net and DDPM noise scheduler, frozen, from a local diffusers dir."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = resolve_hf_path(
        name_or_path,
        "Stable Diffusion 1.5 (diffusers layout)",
        SD15_HOW_TO_GET,
        required_files=(
            "unet/config.json",
            "vae/config.json",
            "text_encoder/config.json",
            "tokenizer",
            "scheduler/scheduler_config.json",
        ),
    )
    comps = SDComponents(
        tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(root, subfolder="vae"),
        unet=UNet2DConditionModel.from_pretrained(root, subfolder="unet"),
        noise_scheduler=DDPMScheduler.from_pretrained(root, subfolder="scheduler"),
        root=root,
    )
    for m in (comps.text_encoder, comps.vae, comps.unet):
        m.requires_grad_(False)
    comps.vae.eval()
    return comps


def tokenize(tokenizer: Any, prompt: str) -> torch.Tensor:
    """[1, 77] input ids (padded to the tokenizer's max length, as the DreamBooth example)."""
    return tokenizer(
        prompt,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids


def encode_prompt(text_encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(input_ids.to(text_encoder.device), return_dict=False)[0]


def add_unet_lora(unet: nn.Module, rank: int) -> None:
    """peft LoRA on the attention projections, as diffusers' train_dreambooth_lora.py (alpha = rank)."""
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
    )


def save_stage1_lora(unet: nn.Module, text_encoder: nn.Module | None, out_dir: str | os.PathLike) -> Path:
    """``pytorch_lora_weights.safetensors`` in diffusers format (loads with ``pipe.load_lora_weights(dir)``)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    te_layers = None
    if text_encoder is not None:
        te_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written into a temp dir, then renamed over the final name: a crash never leaves half a file.
    tmp = Path(tempfile.mkdtemp(prefix=".lora.", dir=out_dir))
    try:
        StableDiffusionPipeline.save_lora_weights(
            str(tmp),
            unet_lora_layers=unet_layers,
            text_encoder_lora_layers=te_layers,
            safe_serialization=True,
        )
        os.replace(tmp / LORA_WEIGHTS_NAME, out_dir / LORA_WEIGHTS_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / LORA_WEIGHTS_NAME


def read_stage1_lora(ckpt_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(unet, text_encoder) LoRA state dicts in peft key format from a stage-1 checkpoint or output dir."""
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / LORA_WEIGHTS_NAME
    if not path.is_file():
        raise MissingWeightsError(
            f"stage-1 LoRA not found: expected {path} (written by train/stage1-full/train.py into every "
            f"checkpoint-<step>/ and its --output_dir)"
        )
    state = load_file(str(path))
    unet_sd = normalize_lora_keys(state, "unet")
    te_sd = normalize_lora_keys(state, "text_encoder")
    if not unet_sd:
        raise ValueError(f"{path} holds no U-Net LoRA weights (keys start with: {sorted(state)[:3]})")
    return unet_sd, te_sd


def load_stage1_lora_into_peft(
    unet: nn.Module, text_encoder: nn.Module | None, ckpt_dir: str | os.PathLike
) -> None:
    """Load a stage-1 LoRA into peft-adapted modules (stage-1 resume), strictly."""
    from peft.utils import set_peft_model_state_dict

    unet_sd, te_sd = read_stage1_lora(ckpt_dir)
    result = set_peft_model_state_dict(unet, unet_sd, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise KeyError(f"stage-1 LoRA keys not in the U-Net: {unexpected[:3]}")
    if text_encoder is not None:
        if not te_sd:
            raise KeyError(f"{ckpt_dir} has no text-encoder LoRA but --train_text_encoder is set")
        load_text_encoder_lora(text_encoder, te_sd)


def setup_text_encoder_lora(text_encoder: nn.Module, rank: int, gradient_checkpointing: bool) -> None:
    add_text_encoder_lora(text_encoder, rank)
    if gradient_checkpointing:
        text_encoder.gradient_checkpointing_enable()
    text_encoder.train()


def load_tiny_vae(path: str | os.PathLike) -> nn.Module:
    """A diffusers AutoencoderTiny from a local directory (for the DINOv2 loss decode only)."""
    from diffusers import AutoencoderTiny

    from utils.weights import require_dir

    directory = require_dir(
        path,
        "AutoencoderTiny (--dinov2_tiny_vae)",
        "Download madebyollin/taesd (diffusers format, config.json + diffusion_pytorch_model.safetensors) "
        "on a machine with network and pass its directory.",
    )
    if not (directory / "config.json").is_file():
        raise MissingWeightsError(
            f"--dinov2_tiny_vae {directory}: no config.json (not a diffusers model dir)"
        )
    vae = AutoencoderTiny.from_pretrained(directory)
    vae.requires_grad_(False).eval()
    return vae
