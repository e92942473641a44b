"""What a U-REPA checkpoint directory holds beyond ``accelerator.save_state``'s optimizer/scheduler/RNG files.

    checkpoint-<step>/
        trainable_state.safetensors         live trained parameters (LoRA / whitelisted blocks + heads)
        ema_state.safetensors               their EMA (what evaluation uses)
        pytorch_lora_weights.safetensors    live LoRA, diffusers format (pipe.load_lora_weights)
        ema_lora/pytorch_lora_weights.safetensors   EMA LoRA, diffusers format
        urepa_config.yaml                   the resolved training config
        trainer_state.json                  step, skipped steps, EMA update count (training core)
        optimizer.bin, scheduler.bin, sampler.bin, random_states_*.pkl   (accelerate, read weights_only=True)

The frozen 860M U-Net is never written: the save hook pops it from accelerate's list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from utils.config import yaml_load

TRAINABLE_FILE = "trainable_state.safetensors"
EMA_FILE = "ema_state.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMA_LORA_DIR = "ema_lora"
CONFIG_FILE = "urepa_config.yaml"


def save_extra_state(model: Any, ema: Any, config: dict[str, Any], out_dir: str | os.PathLike) -> None:
    """Write the files above (main process only; ``out_dir`` is accelerate's temporary checkpoint dir)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous().cpu() for k, v in model.trainable_state_dict().items()},
        str(out_dir / TRAINABLE_FILE),
    )
    save_file({k: v.contiguous().cpu() for k, v in ema.shadow.items()}, str(out_dir / EMA_FILE))
    if model.lora_targets:
        save_file(
            {k: v.contiguous().cpu() for k, v in model.lora_state_dict_diffusers().items()},
            str(out_dir / LORA_FILE),
        )
        with ema.average_parameters(model):
            lora = model.lora_state_dict_diffusers()
        (out_dir / EMA_LORA_DIR).mkdir(exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in lora.items()}, str(out_dir / EMA_LORA_DIR / LORA_FILE))
        write_urepa_card(config, out_dir, ema=False)
        write_urepa_card(config, out_dir / EMA_LORA_DIR, ema=True)
    (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))


def write_urepa_card(config: dict[str, Any], folder: str | os.PathLike, ema: bool) -> Path:
    """README.md (Hugging Face model card, utils/model_card.py) next to a U-REPA LoRA file."""
    from utils.model_card import lora_card, write_card

    model, data, sampling = config.get("model", {}), config.get("data", {}), config.get("sampling", {})
    lora = model.get("lora", {})
    flags = {
        f"{section}.{k}": v
        for section in ("model", "loss", "optim", "train")
        for k, v in (config.get(section) or {}).items()
        if not isinstance(v, dict)
    }
    flags.update({f"model.lora.{k}": v for k, v in lora.items()})
    card = lora_card(
        base_model=str(model.get("pretrained", "stable-diffusion-v1-5")),
        title="U-REPA LoRA on Stable Diffusion 1.5" + (" (EMA weights)" if ema else ""),
        description=(
            "LoRA of the SD-1.5 U-Net fine-tuned with U-REPA (diffusion loss + alignment of U-Net features with "
            f"DINOv2 tokens at {', '.join(model.get('align_layers', []))}); the alignment heads are not part of "
            "this file and are not needed for sampling. "
            + (
                "These are the EMA-averaged weights (what the sample grids use). "
                if ema
                else "These are the live (not averaged) weights. "
            )
            + "Trained with train_sd15.py of this repository."
        ),
        weight_names=[LORA_FILE],
        prompts={"caption": "a photo of a goldfish"},
        flags=flags,
        data_split=(
            f"Training captions/latents from `{data.get('csv')}` (latents `{data.get('latent_dir')}`, DINO tokens "
            f"`{data.get('dino_dir')}`, text embeddings `{data.get('clip_embeddings')}`); prompt dropout "
            f"{data.get('cfg_dropout')} for classifier-free guidance."
        ),
        sampling={
            "num_inference_steps": sampling.get("num_steps", 25),
            "guidance_scale": sampling.get("cfg_scale", 7.5),
        },
        extra_loading_note=(
            f"The repository samples with `{sampling.get('sampler', 'dpmsolver++')}` and guidance only on the "
            f"interval [{sampling.get('guidance_low', 0.0)}, {sampling.get('guidance_high', 0.7)}] of the noise "
            "levels (docs/urepa.md); the stock pipeline applies guidance at every step. "
            "The prompt above is an example; the LoRA was trained on the captions of its data set."
        ),
        tags=["u-repa", "representation-alignment"],
    )
    return write_card(card, folder)


def load_trainable(model: Any, ckpt_dir: str | os.PathLike, use_ema: bool = True) -> None:
    """Load the EMA (default) or live trained parameters of a checkpoint into a freshly built model."""
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / (EMA_FILE if use_ema else TRAINABLE_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {ckpt_dir} a train_sd15.py checkpoint directory?")
    state = load_file(str(path))
    model.load_trainable_state_dict({k: v.to(torch.float32) for k, v in state.items()})


def load_checkpoint_config(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {ckpt_dir} a train_sd15.py checkpoint directory?")
    return yaml_load(path.read_text())
