"""Distil a latent-space patch head for DINOv2: SD latents in, DINOv2 features of the real image out.

    accelerate launch train/latent_dino_head/train.py --sd_path models/stable-diffusion-v1-5 \
        --dino_source facebook/dinov2-small --dino_variant vits14 --resolution 224 \
        --data_dir /data/imagenet --output_dir outputs/latent_dino_head --max_train_steps 20000

For each batch of real images x (resized/cropped to ``--image_size``): the teacher is the frozen DINOv2 adapter
on x; the student is ``LatentDINOv2`` (same frozen DINOv2, patch embedding replaced by ``LatentPatchHead``) on
``vae.encode(x).latent_dist.mean * scaling_factor``. Loss = mean over the final patch tokens and the
``--layers`` intermediate blocks of ``MSE(student, teacher)``; only the head is trained. The head is written to
``<output_dir>/latent_dino_head.safetensors`` (and into every ``checkpoint-<step>/``); load it with
``LatentDINOv2.from_head_file(encoder, path)``. Runs on the shared training core (``docs/training_core.md``):
``--resume_from_checkpoint latest``, ``--mixed_precision``, several processes with ``accelerate launch``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import json

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from models.dinov2_encoder import DINOv2Encoder
from models.latent_dino_head import LatentDINOv2, LatentPatchHead
from train.core import (
    Optim,
    StepContext,
    Task,
    add_core_args,
    compile_module,
    core_config_from_args,
    epoch_stream,
    loader_kwargs,
    make_accelerator,
    make_adamw,
    make_lr_scheduler,
    prepare_model,
    run_training,
    to_channels_last,
)
from train.dinovq.data import EpochShuffleSampler, ImageDataset, find_images
from utils.cli import run_cli
from utils.logging import get_logger
from utils.weights import resolve_hf_path

logger = get_logger("latent_dino_head")
HEAD_FILE = "latent_dino_head.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_core_args(p, checkpointing_steps=1000, log_every=50)
    p.add_argument(
        "--sd_path", required=True, help="Stable Diffusion 1.5 diffusers dir or cached hub id (uses vae/)."
    )
    p.add_argument(
        "--dino_source",
        default=None,
        help="DINOv2 weights: official .pth, HF dir/hub id, or none for the torch.hub cache.",
    )
    p.add_argument("--dino_variant", default="vits14", help="DINOv2 variant (vits14, vitb14, ..., _reg).")
    p.add_argument("--resolution", type=int, default=224, help="DINOv2 input resolution (multiple of 14).")
    p.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="Image side fed to the VAE (multiple of 8); default: resolution rounded up to 8.",
    )
    p.add_argument("--data_dir", required=True, help="Image folder (recursive) or ImageNet root.")
    p.add_argument(
        "--layers", type=int, nargs="*", default=[], help="Also match these 0-based DINOv2 block outputs."
    )
    p.add_argument("--hidden", type=int, default=256, help="Head width.")
    p.add_argument("--depth", type=int, default=3, help="Number of 3x3 conv layers in the head.")
    p.add_argument("--batch_size", type=int, default=32, help="Batch size per process.")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the head.")
    p.add_argument("--lr_scheduler", default="constant", help="diffusers get_scheduler name.")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--max_grad_norm", type=float, default=0.0, help="Gradient clipping (0: off).")
    p.add_argument("--num_workers", type=int, default=4)
    args = p.parse_args(argv)
    if args.resolution % 14:
        p.error(f"--resolution must be a multiple of 14, got {args.resolution}")
    args.image_size = args.image_size or -(-args.resolution // 8) * 8
    if args.image_size % 8:
        p.error(f"--image_size must be a multiple of 8, got {args.image_size}")
    return args


def load_vae(sd_path: str, device: torch.device):
    from diffusers import AutoencoderKL

    root = resolve_hf_path(
        sd_path,
        "Stable Diffusion 1.5 (for its VAE)",
        "Download stable-diffusion-v1-5/stable-diffusion-v1-5 (diffusers format) into the HF cache or pass a "
        "local dir.",
        required_files=("vae/config.json",),
    )
    return AutoencoderKL.from_pretrained(root, subfolder="vae").to(device).eval().requires_grad_(False)


def distill_loss(student, teacher, layers: list[int]) -> torch.Tensor:
    terms = [F.mse_loss(student.patch_tokens.float(), teacher.patch_tokens.float())]
    terms += [F.mse_loss(student.intermediate[k].float(), teacher.intermediate[k].float()) for k in layers]
    return torch.stack(terms).mean()


def main(argv: list[str] | None = None) -> list[float]:
    """Train; returns the logged losses (one per ``--log_every`` steps) of this run's ``losses.jsonl``."""
    args = parse_args(argv)
    cfg = core_config_from_args(args, "latent_dino_head")
    accelerator = make_accelerator(cfg)  # seeds before the head is built
    device = accelerator.device
    out = Path(args.output_dir)

    teacher = DINOv2Encoder.from_pretrained(
        args.dino_source, variant=args.dino_variant, resolution=args.resolution, input_range="-1_1"
    ).to(device)
    vae = load_vae(args.sd_path, device)
    head = LatentPatchHead(
        teacher.embed_dim, latent_channels=vae.config.latent_channels, hidden=args.hidden, depth=args.depth
    )
    student = LatentDINOv2(teacher, head).to(device)
    prepare_model(student, cfg)  # --channels_last / --compile model
    compile_module(teacher, cfg, "dinov2")
    to_channels_last(vae, cfg)
    opt = make_adamw(head.parameters(), cfg, lr=args.lr, weight_decay=0.0)  # --fused_adamw
    sched = make_lr_scheduler(
        args.lr_scheduler,
        opt,
        warmup_steps=args.lr_warmup_steps,
        max_steps=args.max_train_steps,
        num_processes=accelerator.num_processes,
    )
    ds = ImageDataset(
        find_images(args.data_dir), (args.image_size, args.image_size), augment=True, seed=args.seed
    )
    if len(ds) < args.batch_size * accelerator.num_processes:
        raise ValueError(
            f"{len(ds)} images < one global batch ({args.batch_size} x {accelerator.num_processes})"
        )
    sampler = EpochShuffleSampler(len(ds), seed=args.seed)
    dl = DataLoader(
        ds,
        batch_size=args.batch_size,
        sampler=sampler,
        drop_last=True,
        **loader_kwargs(cfg, args.num_workers, epoch_state=True),  # augmentation drawn per epoch
    )

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            accelerator.unwrap_model(models[0]).save_head(Path(output_dir) / HEAD_FILE)
        while weights:  # the head file replaces accelerate's full-model dump (teacher included)
            weights.pop()

    def load_hook(models, input_dir):
        from safetensors.torch import load_file

        accelerator.unwrap_model(models.pop()).head.load_state_dict(
            load_file(str(Path(input_dir) / HEAD_FILE))
        )

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    student, opt, sched, dl = accelerator.prepare(student, opt, sched, dl)
    scale = vae.config.scaling_factor
    layers = sorted(set(args.layers))

    def step_fn(micro: list[dict], ctx: StepContext) -> dict[str, torch.Tensor]:
        total = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            imgs = batch["image"].to(device)
            with torch.no_grad(), accelerator.autocast():
                target = teacher(imgs, layers=layers or None)
                latents = vae.encode(imgs.to(vae.dtype)).latent_dist.mean * scale
            with ctx.micro_step(i), accelerator.autocast():
                loss = distill_loss(student(latents.float(), layers=layers or None), target, layers)
                ctx.backward(loss)
            total = total + loss.detach() / len(micro)
        return {"loss": total}

    def on_epoch(epoch: int) -> None:
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)

    def save_final() -> None:
        accelerator.unwrap_model(student).save_head(out / HEAD_FILE)
        logger.info("head saved to %s", out / HEAD_FILE)

    run_training(
        accelerator,
        cfg,
        Task(
            step_fn=step_fn,
            batches=lambda start: epoch_stream(accelerator, dl, start, on_epoch),
            optims=[Optim("head", opt, sched, list(head.parameters()), args.max_grad_norm)],
            train_modules=[student],
            save_final=save_final,
            tracker_config=vars(args),
        ),
    )
    log = out / "losses.jsonl"
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()] if log.exists() else []


if __name__ == "__main__":
    run_cli(main)  # user errors (paths, values): exit code 2 and a message, no traceback
