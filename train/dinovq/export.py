"""Export a DinoVQ training checkpoint as a tokenizer folder that ``DinoVQModel.from_pretrained`` loads.

    python train/dinovq/export.py outputs/dinovq/checkpoint-20000 --output tokenizers/dinovq-20k
    python train/dinovq/export.py outputs/dinovq/checkpoint-20000 --output DIR --weights live

The folder holds ``config.json`` (the model's constructor arguments, training losses off, plus an ``export``
record: step, weights, source) and ``model.safetensors`` (encoder, codebook, decoders; no discriminator),
written through ``huggingface_hub.PyTorchModelHubMixin.save_pretrained`` into a temporary folder renamed into
place. ``--weights auto`` (default) exports the EMA weights when the run trained with ``--ema``, else the live
ones. The trainer writes ``OUTPUT_DIR/dinovq/`` the same way when it reaches ``max_steps``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import json
import os
import shutil
from typing import Any

import torch
import yaml

from models.dinovq import CONFIG_FILE, TRAINING_ONLY_PREFIX, WEIGHTS_FILE, DinoVQModel
from utils.checkpoint import checkpoint_step
from utils.cli import UserError, run_cli

RUN_CONFIG = "config.yaml"
CHECKPOINT_WEIGHTS = "model.safetensors"  # accelerate's save_state name for the (only) prepared model
EMA_FILE = "ema_state.safetensors"  # the generator's EMA, written into each checkpoint by the trainer
WEIGHT_CHOICES = ("auto", "ema", "live")


def save_tokenizer(
    model: DinoVQModel,
    output: str | os.PathLike,
    export_info: dict[str, Any],
    ema_shadow: dict[str, torch.Tensor] | None = None,
) -> Path:
    """``model`` (its EMA weights ``ema_shadow`` swapped in when given) as a tokenizer folder, atomically.

    The model is not modified. Buffers (the codebook, itself an EMA of the encoder outputs) are the model's.
    """
    output = Path(output)
    tmp = output.with_name(f".{output.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    state = model.tokenizer_state_dict()
    if ema_shadow is not None:
        unknown = sorted(set(ema_shadow) - set(state))
        if unknown:
            raise KeyError(f"EMA weights for tensors the tokenizer does not have: {unknown[:5]}")
        state = {k: ema_shadow[k].to(v.dtype) if k in ema_shadow else v for k, v in state.items()}
    export = DinoVQModel(**model.export_config())
    export.load_state_dict(state, strict=True)
    export.save_pretrained(tmp)
    cfg_path = tmp / CONFIG_FILE
    cfg = json.loads(cfg_path.read_text())
    cfg["export"] = export_info
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if output.exists():
        shutil.rmtree(output)
    os.replace(tmp, output)
    return output


def load_run_model_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``model`` section of a run's resolved ``config.yaml`` (``dino_dim`` already resolved)."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the run's config.yaml (written by train/dinovq/train.py next to its "
            "checkpoints) gives the model's architecture; pass --run_config if it lives elsewhere"
        )
    return read_model_section(path)


def read_model_section(path: str | os.PathLike) -> dict[str, Any]:
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    model_cfg = dict(cfg.get("model") or {})
    if not model_cfg:
        raise UserError(f"{path} has no 'model' section")
    if model_cfg.get("dino_dim") in (None, "auto"):
        raise UserError(
            f"{path}: model.dino_dim is unresolved ({model_cfg.get('dino_dim')!r}); not a run config"
        )
    return model_cfg


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    weights: str = "auto",
    run_config: str | os.PathLike | None = None,
) -> Path:
    """``checkpoint-N`` of a DinoVQ run -> tokenizer folder ``output``; returns ``output``."""
    from safetensors.torch import load_file

    ckpt = Path(checkpoint)
    if weights not in WEIGHT_CHOICES:
        raise UserError(f"--weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt} does not exist")
    model_file = ckpt / CHECKPOINT_WEIGHTS
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} not found: {ckpt} is not a DinoVQ training checkpoint")
    model_cfg = read_model_section(run_config) if run_config else load_run_model_config(ckpt.parent)
    has_ema = (ckpt / EMA_FILE).is_file()
    if weights == "ema" and not has_ema:
        raise UserError(f"--weights ema: {ckpt / EMA_FILE} not found (the run was trained without --ema)")
    use_ema = has_ema and weights != "live"
    model = DinoVQModel(**{**model_cfg, "use_gan": False, "use_perceptual": False})
    state = {k: v for k, v in load_file(str(model_file)).items() if not k.startswith(TRAINING_ONLY_PREFIX)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{model_file} does not match the model of {run_config or ckpt.parent / RUN_CONFIG}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    state_file = ckpt / "trainer_state.json"  # the training core's; older checkpoints: the folder name
    step = json.loads(state_file.read_text())["step"] if state_file.is_file() else checkpoint_step(ckpt)
    info = {
        "weights": "ema" if use_ema else "live",
        "step": step,
        "source": str(ckpt.resolve()),
    }
    shadow = load_file(str(ckpt / EMA_FILE)) if use_ema else None
    return save_tokenizer(model, output, info, ema_shadow=shadow)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="a checkpoint-N directory of a train/dinovq/train.py run")
    parser.add_argument("--output", required=True, help="tokenizer folder to write (replaced if it exists)")
    parser.add_argument(
        "--weights",
        choices=WEIGHT_CHOICES,
        default="auto",
        help="ema: the generator's EMA (runs trained with --ema); live: the optimised weights; "
        "auto: ema when the checkpoint has it, else live",
    )
    parser.add_argument(
        "--run_config",
        default=None,
        help="the run's config.yaml (default: the one next to the checkpoint, in its output directory)",
    )
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.output, args.weights, args.run_config)
    info = json.loads((out / CONFIG_FILE).read_text())["export"]
    print(
        f"exported {info['weights']} weights of step {info['step']} to {out} ({CONFIG_FILE}, {WEIGHTS_FILE})"
    )
    return out


if __name__ == "__main__":
    run_cli(main)
