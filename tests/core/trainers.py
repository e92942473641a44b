"""Every trainer of the repo described the same way for the training-core tests: how to call it on the tiny
offline assets with the core's settings, and which file holds its trained weights in a checkpoint."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Trainer:
    name: str
    script: str  # entry point, relative to the repo root
    weights_file: str  # trained weights inside checkpoint-<step>/
    argv: Callable[..., list[str]]  # (tiny, out, steps, resume, extra) -> argv

    def main(self):
        spec = importlib.util.spec_from_file_location(f"core_test_{self.name}", REPO / self.script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main


def _anomaly(tiny, out, steps, resume, extra, *, stage2: bool) -> list[str]:
    argv = [
        "--pretrained_model_name_or_path", str(tiny["sd15"]),
        "--instance_data_dir", str(tiny["mvtec"]),
        "--mvtec_name", "hazelnut",
        "--output_dir", str(out),
        "--resolution", "32",
        "--train_batch_size", "2",
        "--learning_rate", "1e-3",
        "--lr_scheduler", "cosine",
        "--lr_warmup_steps", "1",
        "--max_train_steps", str(steps),
        "--rank", "2",
        "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "1",
        "--max_consecutive_nonfinite", "2",
        "--log_every", "1",
        "--report_to", "none",
        "--mixed_precision", "no",
        "--seed", "3",
    ]  # fmt: skip
    if stage2:
        argv += ["--mvtec_anamaly_name", "hole", "--train_batch_size", "1"]
    if resume:
        argv += ["--resume_from_checkpoint", resume]
    return argv + list(extra)


def _dinovq(tiny, out, steps, resume, extra) -> list[str]:
    sets = [
        "model.img_size=[28,28]", "model.patch_size=7", "model.encoder_embed_dim=32", "model.encoder_depth=1",
        "model.decoder_depth=1", "model.dino_decoder_depth=1", "model.num_heads=2", "model.codebook_size=16",
        "model.codebook_dim=8", "model.disc_dim=8", "model.disc_num_layers=1", "model.disc_start=2",
        "dino.resolution=28", f"dino.source={tiny['dinov2_official']}", f"data.train_dir={tiny['imagenet']}",
        "data.val_size=0", "train.batch_size=2", "train.log_every=1", "train.eval_every=1000",
        "train.checkpointing_steps=1", "train.checkpoints_total_limit=1", "train.lr_scheduler=cosine",
        "train.warmup_steps=1", "train.max_consecutive_nonfinite=2", "eval.lpips=false", "eval.rfid=false",
    ]  # fmt: skip
    argv = ["--config", str(REPO / "configs" / "dinovq_tiny_demo.yaml"), "--output_dir", str(out)]
    argv += ["--max_steps", str(steps)] + (["--resume_from_checkpoint", resume] if resume else [])
    return argv + ["--set", *sets, *extra]


def _latent_head(tiny, out, steps, resume, extra) -> list[str]:
    argv = [
        "--sd_path", str(tiny["sd15"]),
        "--dino_source", str(tiny["dinov2_official"]),
        "--dino_variant", "tiny14",
        "--resolution", "28",
        "--image_size", "32",
        "--data_dir", str(tiny["imagenet"]),
        "--output_dir", str(out),
        "--hidden", "16",
        "--depth", "1",
        "--batch_size", "2",
        "--lr", "1e-3",
        "--lr_scheduler", "cosine",
        "--lr_warmup_steps", "1",
        "--max_train_steps", str(steps),
        "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "1",
        "--max_consecutive_nonfinite", "2",
        "--log_every", "1",
        "--num_workers", "0",
        "--report_to", "none",
        "--mixed_precision", "no",
        "--seed", "3",
    ]  # fmt: skip
    return argv + (["--resume_from_checkpoint", resume] if resume else []) + list(extra)


def _sd15(tiny, out, steps, resume, extra) -> list[str]:
    return [
        "--config", str(REPO / "tests" / "urepa" / "tiny_test.yaml"),
        "--set",
        f"output_dir={out}",
        f"model.pretrained={tiny['sd15']}",
        f"train.max_steps={steps}",
        "train.checkpointing_steps=1",
        "train.checkpoints_total_limit=1",
        "train.max_consecutive_nonfinite=2",
        "optim.warmup_ratio=0.25",
        f"train.resume_from_checkpoint={resume or 'null'}",
        *extra,
    ]  # fmt: skip


def _downstream(tiny, out, steps, resume, extra, *, job: str) -> list[str]:
    argv = [
        "--class_name", "hazelnut",
        "--mvtec_root", str(tiny["mvtec"]),
        "--output_dir", str(out),
        "--train_batch_size", "2",
        "--max_train_steps", str(steps),
        "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "1",
        "--max_consecutive_nonfinite", "2",
        "--log_every", "1",
        "--report_to", "none",
        "--mixed_precision", "no",
        "--seed", "3",
        "--skip_eval",
    ]  # fmt: skip
    if job == "localization":  # the Perlin baseline needs no generated data
        argv += ["--source", "perlin", "--resolution", "64", "--base_width", "4"]
    else:
        from preprocessing.standin_generated import write_standin_pairs

        gen = Path(out).parent / f"{Path(out).name}_generate_data"
        write_standin_pairs(gen, "hazelnut", num_images=2, size=64)
        argv += ["--generated_root", str(gen), "--resolution", "32", "--resnet_weights", "none"]
        # a ResNet-34 checkpoint is ~255 MB: save only the last step (its own tests cover resume)
        argv += ["--checkpointing_steps", "0"]
    return argv + (["--resume_from_checkpoint", resume] if resume else []) + list(extra)


# Trainers too heavy for every core test on CPU: only the 2-process test runs them here (their own test files
# check fresh-run reproducibility and exact resume).
HEAVY = {"downstream_classification"}

TRAINERS = {
    t.name: t
    for t in (
        Trainer(
            "stage1",
            "train/stage1-full/train.py",
            "pytorch_lora_weights.safetensors",
            lambda *a: _anomaly(*a, stage2=False),
        ),
        Trainer(
            "stage2",
            "train/stage2-dual/train.py",
            "dual_unet.safetensors",
            lambda *a: _anomaly(*a, stage2=True),
        ),
        Trainer("dinovq", "train/dinovq/train.py", "model.safetensors", _dinovq),
        Trainer(
            "latent_head", "train/latent_dino_head/train.py", "latent_dino_head.safetensors", _latent_head
        ),
        Trainer("sd15", "train_sd15.py", "trainable_state.safetensors", _sd15),
        Trainer(
            "downstream_localization",
            "eval/downstream/localization.py",
            "model.safetensors",
            lambda *a: _downstream(*a, job="localization"),
        ),
        Trainer(
            "downstream_classification",
            "eval/downstream/classification.py",
            "model.safetensors",
            lambda *a: _downstream(*a, job="classification"),
        ),
    )  # fmt: skip
}
