"""Building the U-Net, scheduler config and aligned model from a U-REPA config (shared by train and eval)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.sd15_unet_aligned import SD15UNetAligned
from utils.weights import resolve_hf_path, sd15_how_to_get

SD15_HOW_TO_GET = (
    "Set model.pretrained to a local diffusers directory (unet/, vae/, scheduler/). " + sd15_how_to_get()
)
FINETUNE_MODES = ("lora", "full", "lora+full")


def resolve_sd_dir(pretrained: str) -> Path:
    return resolve_hf_path(
        pretrained,
        "Stable Diffusion 1.5 weights",
        SD15_HOW_TO_GET,
        required_files=("unet/config.json", "scheduler/scheduler_config.json"),
    )


def load_unet(sd_dir: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(sd_dir, subfolder="unet")


def load_scheduler_config(sd_dir: Path) -> dict[str, Any]:
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler.load_config(sd_dir, subfolder="scheduler"))


def load_vae(sd_dir: Path):
    from diffusers import AutoencoderKL

    if not (sd_dir / "vae" / "config.json").is_file():
        raise FileNotFoundError(
            f"{sd_dir}/vae/config.json not found (needed to decode samples). {SD15_HOW_TO_GET}"
        )
    return AutoencoderKL.from_pretrained(sd_dir, subfolder="vae")


def build_aligned_model(
    model_cfg: dict[str, Any], unet: Any, D: int, grid: tuple[int, int], align: bool, verbose: bool = True
) -> SD15UNetAligned:
    """Wrap ``unet``; ``align=False`` (lambda 0, the baseline) builds no heads and registers no hooks."""
    mode = model_cfg.get("finetune", "lora")
    if mode not in FINETUNE_MODES:
        raise ValueError(f"model.finetune must be one of {FINETUNE_MODES}, got {mode!r}")
    lora_cfg = dict(model_cfg.get("lora") or {}) if mode in ("lora", "lora+full") else None
    model = SD15UNetAligned(
        unet,
        align_layers=tuple(model_cfg.get("align_layers", ["mid"])) if align else (),
        D=D,
        lora_config=lora_cfg,
        grid=grid,
        full_finetune=mode in ("full", "lora+full"),
        verbose=verbose,
    )
    if model_cfg.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    return model
