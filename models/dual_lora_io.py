"""Stage-2 (dual LoRA) weights on disk: save / load, the text-encoder LoRA, and per-branch diffusers exports.

The model is :class:`models.dual_lora.DualLoRAUNet`; its joint sampler is ``models/dual_anodiff_pipeline.py``
(Python) and ``eval/generate.py stage2`` (CLI). A weights directory (a stage-2 ``--output_dir`` or
``checkpoint-<step>/``) holds ``dual_unet.safetensors`` (LoRA sets + interaction modules),
``text_encoder_lora.safetensors`` (when the text encoder was trained) and ``dual_config.json`` (what rebuilds
the model); :func:`export_branch_loras` adds one stock diffusers LoRA file per branch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.dual_lora import (
    BRANCHES,
    DUAL_CONFIG_NAME,
    DUAL_WEIGHTS_NAME,
    TEXT_ENCODER_LORA_TARGETS,
    TEXT_ENCODER_WEIGHTS_NAME,
    DualLoRAUNet,
)


def normalize_lora_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Diffusers-format LoRA keys (``unet.<path>.lora.down.weight`` / ``lora_linear_layer.up`` / peft
    ``lora_A``) under ``prefix`` -> peft keys without the prefix (``<path>.lora_A.weight``)."""
    out = {}
    for k, v in state.items():
        if not k.startswith(prefix + "."):
            continue
        k = k[len(prefix) + 1 :]
        if k.endswith(".alpha"):
            continue
        for old, new in (
            (".lora.down.", ".lora_A."),
            (".lora.up.", ".lora_B."),
            (".lora_linear_layer.down.", ".lora_A."),
            (".lora_linear_layer.up.", ".lora_B."),
            (".lora_A.default.", ".lora_A."),
            (".lora_B.default.", ".lora_B."),
        ):
            k = k.replace(old, new)
        out[k] = v
    return out


def add_text_encoder_lora(text_encoder: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Inject a peft LoRA adapter into the CLIP text encoder's attention projections (in place)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights="gaussian",
        target_modules=list(TEXT_ENCODER_LORA_TARGETS),
    )
    # ``inject_adapter_in_model`` rather than transformers' ``add_adapter``: the latter refuses the
    # peft version pinned in requirements.txt, the former is what diffusers' loader uses anyway.
    inject_adapter_in_model(config, text_encoder, adapter_name="default")
    for name, p in text_encoder.named_parameters():
        p.requires_grad_("lora_" in name)
    return text_encoder


def text_encoder_lora_state_dict(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(text_encoder)


def load_text_encoder_lora(text_encoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load peft-format text-encoder LoRA weights (keys ``<path>.lora_A.weight``), strictly."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(text_encoder, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", []) or []
    lora_missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or lora_missing:
        raise KeyError(f"text-encoder LoRA mismatch: unexpected {unexpected[:3]}, missing {lora_missing[:3]}")


def save_dual_weights(
    model: DualLoRAUNet, text_encoder: nn.Module | None, out_dir: str | os.PathLike, extra: dict | None = None
) -> Path:
    """Write ``dual_unet.safetensors`` (+ ``text_encoder_lora.safetensors``) and ``dual_config.json``."""
    from utils.checkpoint import atomic_write, save_safetensors_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _unwrap(model)
    save_safetensors_atomic(model.trainable_state_dict(), out_dir / DUAL_WEIGHTS_NAME)
    config = model.config_dict()
    config["text_encoder_lora"] = text_encoder is not None
    if text_encoder is not None:
        te_state = text_encoder_lora_state_dict(_unwrap(text_encoder))
        if not te_state:
            raise ValueError("save_dual_weights: the text encoder has no LoRA adapter")
        save_safetensors_atomic(te_state, out_dir / TEXT_ENCODER_WEIGHTS_NAME)
        config["text_encoder_rank"] = int(next(v for k, v in te_state.items() if "lora_A" in k).shape[0])
    config.update(extra or {})
    with atomic_write(out_dir / DUAL_CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return out_dir


# fg background of stage-2 weights whose dual_config.json predates --fg_background (they were trained black)
LEGACY_FG_BACKGROUND = "black"


def read_dual_config(weights_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(weights_dir) / DUAL_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {weights_dir} is not a stage-2 (dual LoRA) weights directory. It is written by "
            f"train/stage2-dual/train.py into --output_dir and every checkpoint-<step>/ directory."
        )
    config = json.loads(path.read_text())
    # Weights written before the interaction presets existed used the light module, zero-initialised.
    config.setdefault("interaction_preset", "light")
    config.setdefault("interaction_init", "zero")
    return config


def load_dual_weights(
    model: DualLoRAUNet, text_encoder: nn.Module | None, weights_dir: str | os.PathLike
) -> dict[str, Any]:
    """Load what :func:`save_dual_weights` wrote into an already-built model (+ text encoder)."""
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir)
    config = read_dual_config(weights_dir)
    model = _unwrap(model)
    model.load_trainable_state_dict(load_file(str(weights_dir / DUAL_WEIGHTS_NAME)))
    if text_encoder is not None and config.get("text_encoder_lora"):
        load_text_encoder_lora(_unwrap(text_encoder), load_file(str(weights_dir / TEXT_ENCODER_WEIGHTS_NAME)))
    return config


def dual_unet_from_config(unet: nn.Module, config: dict[str, Any]) -> DualLoRAUNet:
    """The (untrained) stage-2 model that ``dual_config.json`` describes, built on ``unet``."""
    model_class, extra = DualLoRAUNet, {}
    if config.get("background_compensation"):  # DualAnoDiff's BCM variant (models/bcm_reference_attention.py)
        from models.bcm_reference_attention import BCMDualLoRAUNet as model_class

        extra["bcm_mlp_hidden"] = int(config["bcm_mlp_hidden"])
    return model_class(
        unet,
        rank=int(config["rank"]),
        alpha=float(config["alpha"]),
        dual_mode=config["dual_mode"],
        interaction_reduction=int(config["interaction_reduction"]),
        target_modules=tuple(config["target_modules"]),
        interaction_preset=config["interaction_preset"],
        interaction_init=config["interaction_init"],
        **extra,
    )


def load_dual_unet(
    pretrained_model_name_or_path: str | os.PathLike,
    weights_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Build SD-1.5 components with the stage-2 weights applied, for generation.

    Returns ``{"vae", "text_encoder", "tokenizer", "scheduler", "dual_unet", "config"}``; all in eval mode
    on ``device``/``dtype`` (``scheduler`` is the model's own noise scheduler config, a DDPMScheduler).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from utils.weights import resolve_hf_path, sd15_how_to_get

    config = read_dual_config(weights_dir)
    root = resolve_hf_path(
        pretrained_model_name_or_path,
        "Stable Diffusion 1.5 base model",
        sd15_how_to_get(),
        required_files=("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer"),
    )
    dual = dual_unet_from_config(UNet2DConditionModel.from_pretrained(root, subfolder="unet"), config)
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
    if config.get("text_encoder_lora"):
        add_text_encoder_lora(text_encoder, rank=int(config["text_encoder_rank"]))
    load_dual_weights(dual, text_encoder, weights_dir)
    components = {
        "vae": AutoencoderKL.from_pretrained(root, subfolder="vae"),
        "text_encoder": text_encoder,
        "tokenizer": CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        "scheduler": DDPMScheduler.from_pretrained(root, subfolder="scheduler"),
        "dual_unet": dual,
        "config": config,
    }
    for key in ("vae", "text_encoder", "dual_unet"):
        components[key].to(device=device, dtype=dtype).eval().requires_grad_(False)
    return components


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / torch.compile wrappers (accelerate's ``unwrap_model`` without needing an Accelerator)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------------------------------------- export
# Standard diffusers LoRA files, one per branch, for use outside this repository. They hold a branch's LoRA set
# only: a stock pipeline that loads one runs that branch alone, WITHOUT the branch interaction modules (which
# need both branches in one batch); use DualAnoDiffPipeline (models/dual_anodiff_pipeline.py) for joint sampling.

BRANCH_LORA_NAMES = {
    "blend": "pytorch_lora_weights_blend.safetensors",
    "fg": "pytorch_lora_weights_fg.safetensors",
}


def branch_lora_state_dict(model: nn.Module, branch: str) -> dict[str, torch.Tensor]:
    """LoRA set of ``branch`` ("blend" | "fg") in peft keys (``<module path>.lora_A.weight``), copied.

    In ``dual_mode="shared"`` both branches have the same (single) set.
    """
    model = _unwrap(model)
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    index = BRANCHES.index(branch) if model.dual_mode == "interrelated" else 0
    state = {}
    for name, layer in model.lora_layers().items():
        state[f"{name}.lora_A.weight"] = layer.lora_A[index].weight.detach().float().cpu().clone()
        state[f"{name}.lora_B.weight"] = layer.lora_B[index].weight.detach().float().cpu().clone()
    return state


def _ordered(metadata: dict[str, Any]) -> dict[str, Any]:
    """peft keeps ``target_modules`` as a set, which diffusers writes with ``list(set)``: an order that follows
    the per-process string hash, so two same-seed exports differed in bytes. Sorted lists are stable."""
    return {k: sorted(v) if isinstance(v, set | frozenset) else v for k, v in metadata.items()}


def export_branch_loras(
    model: nn.Module, text_encoder: nn.Module | None, out_dir: str | os.PathLike
) -> dict[str, Path]:
    """Write ``pytorch_lora_weights_{blend,fg}.safetensors`` through diffusers' ``save_lora_weights``.

    Each file: that branch's U-Net LoRA set (+ the text-encoder LoRA, shared by both branches, when
    ``text_encoder`` carries one), peft keys, the LoRA config (rank, alpha, targets) as adapter metadata.
    ``pipe.load_lora_weights(out_dir, weight_name=BRANCH_LORA_NAMES["blend"])`` then reproduces the blend
    branch run alone (``DualLoRAUNet.forward_branch``), i.e. without the interaction. Returns {branch: path}.
    """
    import shutil
    import tempfile

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    model = _unwrap(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = sorted(model.lora_layers())
    unet_metadata = _ordered(
        LoraConfig(r=model.rank, lora_alpha=model.alpha, target_modules=modules).to_dict()
    )
    te_layers = te_metadata = None
    if text_encoder is not None:
        te = _unwrap(text_encoder)
        te_layers = {k: v.detach().float().cpu().clone() for k, v in text_encoder_lora_state_dict(te).items()}
        if not te_layers:
            raise ValueError("export_branch_loras: the text encoder has no LoRA adapter (pass None)")
        te_metadata = _ordered(te.peft_config["default"].to_dict())
    paths = {}
    for branch, name in BRANCH_LORA_NAMES.items():
        # Written into a temporary directory and renamed over the final name: no half-written file.
        tmp = Path(tempfile.mkdtemp(prefix=".lora.", dir=out_dir))
        try:
            StableDiffusionPipeline.save_lora_weights(
                str(tmp),
                unet_lora_layers=branch_lora_state_dict(model, branch),
                text_encoder_lora_layers=te_layers,
                unet_lora_adapter_metadata=unet_metadata,
                text_encoder_lora_adapter_metadata=te_metadata,
                weight_name=name,
                safe_serialization=True,
            )
            os.replace(tmp / name, out_dir / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        paths[branch] = out_dir / name
    return paths
