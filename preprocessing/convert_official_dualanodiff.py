"""Convert weights trained with the official DualAnoDiff code into this repository's stage-2 weights directory.

    python preprocessing/convert_official_dualanodiff.py \\
        --official_weights DualAnoDiff/bcm-dual-interrelated_diff/all_generate/hazelnut/hole \\
        --output_dir all_generate/hazelnut/stage2-hole-official \\
        --pretrained_model_name_or_path models/stable-diffusion-v1-5      # optional: check against the U-Net

``--official_weights``: the official trainers' ``--output_dir`` (or a ``checkpoint-<step>/`` in it) holding
``pytorch_lora_weights.safetensors`` or ``pytorch_lora_weights.bin``, or that file itself. Both official variants
are recognised: ``dual-interrelated_diff/`` (dual LoRA + interaction) and ``bcm-dual-interrelated_diff/`` (+ the
background compensation; its self-attention processors are saved under ``...attn1.processor.chained_proc.``).
Writes ``dual_unet.safetensors``, ``text_encoder_lora.safetensors`` (when the file has text-encoder LoRA) and
``dual_config.json``: what ``eval/generate.py stage2 --weights_dir`` and ``models.dual_lora.load_dual_unet``
read.

Official names -> ours (per attention layer ``<path>`` = ``down_blocks.0.attentions.0.transformer_blocks.0.attn1``):

* ``unet.<path>.processor.to_{q,k,v,out}_lora.{i}.{down,up}.weight`` ->
  ``unet.<path>.{to_q,to_k,to_v,to_out.0}.lora_{A,B}.{i}.weight`` (i = 0 blend, 1 fg; no network alpha:
  scale 1, i.e. our alpha = rank);
* ``temporal_{n,i,q,k,v,o}.{weight,bias}`` -> ``interactions.<path with __>.{norm,proj_in,to_q,to_k,to_v,
  proj_out}.*`` (the ``official`` interaction preset);
* BCM: ``temporal_condition_mlp.{0,1}.*`` / ``temporal_a`` of the self-attention layers ->
  ``compensations.<path with __>.condition_mlp.{0,1}.*`` / ``.mix``. The cross-attention layers carry the same
  parameters in the official file but never use them (no reference state reaches them): they are dropped;
* ``text_encoder.<module>.to_{q,k,v,out}_lora.{down,up}.weight`` -> peft
  ``<module>.{q,k,v,out}_proj.lora_{A,B}.weight``.

Any other key is an error naming it (nothing is dropped silently).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from utils.cli import UserError, run_cli

OFFICIAL_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
# official interaction names (temporal_<x>) -> ours (models.dual_lora.BranchInteraction)
OFFICIAL_TO_OURS_INTERACTION = {
    "n": "norm",
    "i": "proj_in",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "o": "proj_out",
}
OFFICIAL_TO_OURS_TEXT = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}
# the official trainers' hard-coded prompts; their fg image is image x mask on normalised pixels (grey outside)
OFFICIAL_PROMPTS = {"instance_prompt_blend": "a vfx with sks", "instance_prompt_fg": "sks"}

_LORA = re.compile(r"to_(q|k|v|out)_lora\.(\d)\.(down|up)\.weight")
_INTERACTION = re.compile(r"temporal_([niqkvo])\.(weight|bias)")
_BCM_MLP = re.compile(r"temporal_condition_mlp\.(\d)\.(weight|bias)")
_UNET_KEY = re.compile(r"unet\.(?P<path>.+\.attn[12])\.processor\.(?P<chained>chained_proc\.)?(?P<param>.+)")
_TEXT_KEY = re.compile(
    r"text_encoder\.(?P<module>.+)\.to_(?P<proj>q|k|v|out)_lora\.(?P<kind>down|up)\.weight"
)


def official_to_our_key(name: str, attn_path: str) -> str | None:
    """One parameter of the official processor of attention layer ``attn_path`` -> our trainable key.

    ``name`` is relative to the processor (``to_q_lora.0.down.weight``, ``temporal_q.bias``,
    ``temporal_condition_mlp.0.weight``, ``temporal_a``). None for the BCM parameters of a cross-attention
    layer (present in the official files, unused by its maths). Raises ``KeyError`` for an unknown name.
    """
    m = _LORA.fullmatch(name)
    if m:
        proj = "to_out.0" if m[1] == "out" else f"to_{m[1]}"
        return f"unet.{attn_path}.{proj}.{'lora_A' if m[3] == 'down' else 'lora_B'}.{m[2]}.weight"
    key = attn_path.replace(".", "__")
    m = _INTERACTION.fullmatch(name)
    if m:
        return f"interactions.{key}.{OFFICIAL_TO_OURS_INTERACTION[m[1]]}.{m[2]}"
    m = _BCM_MLP.fullmatch(name)
    if m or name == "temporal_a":
        if not attn_path.endswith("attn1"):
            return None
        if name == "temporal_a":
            return f"compensations.{key}.mix"
        if m[1] not in ("0", "1"):
            raise KeyError(f"unexpected official BCM parameter {name!r} at {attn_path}")
        return f"compensations.{key}.condition_mlp.{m[1]}.{m[2]}"
    raise KeyError(f"unknown official processor parameter {name!r} at {attn_path}")


@dataclass
class ConvertedWeights:
    """``unet``: our ``trainable_state_dict`` keys; ``text_encoder``: peft keys (empty without text LoRA);
    ``config``: the ``dual_config.json`` fields; ``dropped``: official keys that the official maths never uses."""

    unet: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    config: dict[str, Any]
    dropped: list[str] = field(default_factory=list)


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> ConvertedWeights:
    """An official DualAnoDiff LoRA file's state dict (either variant) -> this repository's weights."""
    from models.dual_lora import LORA_TARGETS

    unet, text, dropped, unknown = {}, {}, [], []
    bcm = False
    for k, v in state.items():
        m = _UNET_KEY.fullmatch(k)
        if m:
            try:
                ours = official_to_our_key(m["param"], m["path"])
            except KeyError:
                unknown.append(k)
                continue
            if ours is None:
                dropped.append(k)
                continue
            bcm = bcm or ours.startswith("compensations.")
            unet[ours] = v
            continue
        m = _TEXT_KEY.fullmatch(k)
        if m:
            text[
                f"{m['module']}.{OFFICIAL_TO_OURS_TEXT[m['proj']]}.lora_{'A' if m['kind'] == 'down' else 'B'}.weight"
            ] = v
            continue
        unknown.append(k)
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys are not DualAnoDiff LoRA/processor parameters, e.g. {unknown[:3]} (is this a "
            "file of the official dual-interrelated_diff / bcm-dual-interrelated_diff trainers?)"
        )
    downs = [v for k, v in unet.items() if ".lora_A." in k]
    if not downs:
        raise ValueError(
            "no U-Net LoRA parameters (unet.<layer>.processor.to_q_lora.0.down.weight) in the file"
        )
    ranks = {int(v.shape[0]) for v in downs}
    if len(ranks) != 1:
        raise ValueError(f"LoRA ranks differ across layers: {sorted(ranks)}")
    rank = ranks.pop()
    config: dict[str, Any] = {
        "format": "dual_lora_unet/1",
        "rank": rank,
        "alpha": float(rank),  # the official LoRALinearLayer has no network alpha: scale 1
        "dual_mode": "interrelated",
        "interaction_preset": "official",
        "interaction_init": "default",
        "interaction_reduction": 1,
        "target_modules": list(LORA_TARGETS),
        "text_encoder_lora": bool(text),
        "fg_background": "grey",
        **OFFICIAL_PROMPTS,
        "stage_start_step": 0,
    }
    if text:
        config["text_encoder_rank"] = int(next(v for k, v in text.items() if ".lora_A." in k).shape[0])
    if bcm:
        from models.bcm_reference_attention import BCM_CONFIG_KEY

        config[BCM_CONFIG_KEY] = True
        config["bcm_mlp_hidden"] = int(
            next(v for k, v in unet.items() if "condition_mlp.0.weight" in k).shape[0]
        )
    return ConvertedWeights(unet=unet, text_encoder=text, config=config, dropped=dropped)


def find_official_file(path: str | Path) -> Path:
    """The official LoRA file in ``path`` (a file, or a directory holding one of :data:`OFFICIAL_WEIGHT_NAMES`)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in OFFICIAL_WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"no official DualAnoDiff weights in {path}: expected {' or '.join(OFFICIAL_WEIGHT_NAMES)} (the "
            "official trainers' --output_dir or a checkpoint-<step>/ in it)"
        )
    raise FileNotFoundError(f"--official_weights {path}: no such file or directory")


def read_official_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # torch.save'd dict of tensors (LoraLoaderMixin.save_lora_weights without safe_serialization)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return state


def check_against_unet(converted: ConvertedWeights, pretrained_model_name_or_path: str | Path) -> None:
    """Build the model of ``converted.config`` on the base U-Net and load the weights strictly."""
    from diffusers import UNet2DConditionModel

    from models.dual_lora import dual_unet_from_config
    from utils.weights import resolve_hf_path, sd15_how_to_get

    root = resolve_hf_path(
        pretrained_model_name_or_path,
        "Stable Diffusion 1.5 base model",
        sd15_how_to_get(),
        ("unet/config.json",),
    )
    model = dual_unet_from_config(
        UNet2DConditionModel.from_pretrained(root, subfolder="unet"), converted.config
    )
    model.load_trainable_state_dict(converted.unet)


def write_converted(converted: ConvertedWeights, out_dir: str | Path, source: str | None = None) -> Path:
    """Write the weights directory (atomic files, as ``models.dual_lora.save_dual_weights``)."""
    from models.dual_lora import DUAL_CONFIG_NAME, DUAL_WEIGHTS_NAME, TEXT_ENCODER_WEIGHTS_NAME
    from utils.checkpoint import atomic_write, save_safetensors_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(converted.unet, out_dir / DUAL_WEIGHTS_NAME)
    if converted.text_encoder:
        save_safetensors_atomic(converted.text_encoder, out_dir / TEXT_ENCODER_WEIGHTS_NAME)
    config = dict(converted.config)
    if source is not None:
        config["converted_from"] = source
    with atomic_write(out_dir / DUAL_CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return out_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--official_weights",
        required=True,
        help="official trainer output dir / checkpoint dir, or its pytorch_lora_weights.{safetensors,bin}",
    )
    p.add_argument("--output_dir", required=True, help="where to write this repository's stage-2 weights")
    p.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="optional SD-1.5 base: build the model and load the converted weights strictly (shape check)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    src = find_official_file(args.official_weights)
    try:
        converted = convert_official_state_dict(read_official_file(src))
    except ValueError as err:
        raise UserError(f"{src}: {err}") from err
    if args.pretrained_model_name_or_path:
        try:
            check_against_unet(converted, args.pretrained_model_name_or_path)
        except (KeyError, ValueError) as err:
            raise UserError(f"{src} does not fit {args.pretrained_model_name_or_path}: {err}") from err
    write_converted(converted, args.output_dir, source=str(src))
    variant = "BCM" if converted.config.get("background_compensation") else "dual-interrelated"
    print(
        f"{src} ({variant}, rank {converted.config['rank']}, text-encoder LoRA: "
        f"{converted.config['text_encoder_lora']}) -> {args.output_dir} "
        f"({len(converted.unet)} U-Net tensors, {len(converted.dropped)} unused official tensors dropped)"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
