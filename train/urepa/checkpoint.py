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
    (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))


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
