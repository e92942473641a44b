"""Model cards (``README.md``, utils/model_card.py) of the stage-1 LoRA and the stage-2 per-branch LoRAs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from utils.model_card import lora_card, write_card

# DualAnoDiff's inference settings (eval/generate.py --preset official), used in the cards' loading examples
OFFICIAL_SAMPLING = {"scheduler": "pndm", "num_inference_steps": 100, "guidance_scale": 2.5}


def _base(args: argparse.Namespace) -> str:
    return str(args.pretrained_model_name_or_path)


def write_stage1_card(
    args: argparse.Namespace, out_dir: str | os.PathLike, metrics: dict[str, Any] | None = None
) -> Path:
    """README.md next to stage 1's ``pytorch_lora_weights.safetensors``."""
    card = lora_card(
        base_model=_base(args),
        title=f"DualAnoDiff stage-1 LoRA: MVTec AD {args.mvtec_name} (normal images)",
        description=(
            f"DreamBooth-LoRA of Stable Diffusion 1.5 on the `train/good` images of the MVTec AD class "
            f"`{args.mvtec_name}` (stage 1 of DualAnoDiff: the normal appearance the stage-2 dual LoRA starts "
            "from). Trained with train/stage1-full/train.py of this repository."
        ),
        weight_names=["pytorch_lora_weights.safetensors"],
        prompts={"instance": args.instance_prompt},
        trigger_words=[args.instance_prompt],
        class_name=args.mvtec_name,
        flags=vars(args),
        data_split=f"All `{args.mvtec_name}/train/good` images under `{args.instance_data_dir}`.",
        metrics=metrics,
        sampling=OFFICIAL_SAMPLING,
        extra_loading_note="The scheduler of DualAnoDiff's inference is the base model's PNDM (its default).",
        tags=["dualanodiff", "mvtec-ad", "anomaly-generation"],
    )
    return write_card(card, out_dir)


def write_stage2_card(
    args: argparse.Namespace,
    out_dir: str | os.PathLike,
    weight_names: list[str],
    metrics: dict[str, Any] | None = None,
) -> Path:
    """README.md next to stage 2's ``dual_unet.safetensors`` and per-branch LoRA files."""
    card = lora_card(
        base_model=_base(args),
        title=f"DualAnoDiff stage-2 dual LoRA: MVTec AD {args.mvtec_name} / {args.mvtec_anomaly_name}",
        description=(
            f"The two LoRA branches of DualAnoDiff for the defect type `{args.mvtec_anomaly_name}` of "
            f"`{args.mvtec_name}`: the blend branch draws the whole anomalous image, the fg branch the defect on "
            f"a {args.fg_background} background (its mask is extracted from it). Trained with "
            "train/stage2-dual/train.py of this repository."
        ),
        weight_names=weight_names,
        prompts={"blend": args.instance_prompt_blend, "fg": args.instance_prompt_fg},
        trigger_words=[args.instance_prompt_blend, args.instance_prompt_fg],
        class_name=args.mvtec_name,
        defect=args.mvtec_anomaly_name,
        flags=vars(args),
        data_split=(
            f"The few-shot training split (`--split_rule {args.split_rule}`, datasets/mvtec.py) of "
            f"`{args.mvtec_name}/test/{args.mvtec_anomaly_name}` with its ground-truth masks; the rest of the "
            "type's test images are held out for evaluation."
        ),
        metrics=metrics,
        sampling=OFFICIAL_SAMPLING,
        extra_loading_note=(
            "Each branch file alone reproduces that branch without the interaction modules between the two "
            "branches. The joint model (both branches denoised together, as DualAnoDiff generates) needs "
            "`dual_unet.safetensors` + `dual_config.json` and this repository's "
            "`models.dual_anodiff_pipeline.DualAnoDiffPipeline` or `eval/generate.py stage2 --preset official`."
        ),
        tags=["dualanodiff", "mvtec-ad", "anomaly-generation"],
    )
    return write_card(card, out_dir)
