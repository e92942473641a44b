"""Distil a latent-space patch head for DINOv2: SD latents in, DINOv2 features of the real image out.

    python train/latent_dino_head/train.py --sd_path models/stable-diffusion-v1-5 \
        --dino_source facebook/dinov2-small --dino_variant vits14 --resolution 224 \
        --data_dir /data/imagenet --output_dir outputs/latent_dino_head --max_steps 20000

For each batch of real images x (resized/cropped to ``--image_size``): the teacher is the frozen DINOv2 adapter
on x; the student is ``LatentDINOv2`` (same frozen DINOv2, patch embedding replaced by ``LatentPatchHead``) on
``vae.encode(x).latent_dist.mean * scaling_factor``. Loss = mean over the final patch tokens and the
``--layers`` intermediate blocks of ``MSE(student, teacher)``; only the head is trained. The head is written to
``<output_dir>/latent_dino_head.safetensors``; load it with ``LatentDINOv2.from_head_file(encoder, path)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from models.dinov2_encoder import DINOv2Encoder  # noqa: E402
from models.latent_dino_head import LatentDINOv2, LatentPatchHead  # noqa: E402
from train.dinovq.data import EpochShuffleSampler, ImageDataset, find_images  # noqa: E402
from utils.checkpoint import torch_save_atomic  # noqa: E402
from utils.logging import get_logger, progress  # noqa: E402
from utils.seed import seed_everything  # noqa: E402
from utils.weights import resolve_hf_path  # noqa: E402

logger = get_logger("latent_dino_head")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--output_dir", required=True, help="Where the head and the training checkpoint go.")
    p.add_argument(
        "--layers", type=int, nargs="*", default=[], help="Also match these 0-based DINOv2 block outputs."
    )
    p.add_argument("--hidden", type=int, default=256, help="Head width.")
    p.add_argument("--depth", type=int, default=3, help="Number of 3x3 conv layers in the head.")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max_steps", type=int, default=20000)
    p.add_argument("--save_every", type=int, default=1000, help="Checkpoint + head every N steps.")
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mixed_precision", choices=["no", "bf16"], default="no", help="Autocast for teacher/VAE/student."
    )
    p.add_argument("--resume", action="store_true", help="Continue from <output_dir>/checkpoint.pt.")
    p.add_argument("--device", default=None, help="Default: cuda if available else cpu.")
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
        "Download stable-diffusion-v1-5/stable-diffusion-v1-5 (diffusers format) into the HF cache or pass a local dir.",
        required_files=("vae/config.json",),
    )
    return AutoencoderKL.from_pretrained(root, subfolder="vae").to(device).eval().requires_grad_(False)


def distill_loss(student, teacher, layers: list[int]) -> torch.Tensor:
    terms = [F.mse_loss(student.patch_tokens.float(), teacher.patch_tokens.float())]
    terms += [F.mse_loss(student.intermediate[k].float(), teacher.intermediate[k].float()) for k in layers]
    return torch.stack(terms).mean()


def main(argv: list[str] | None = None) -> list[float]:
    args = parse_args(argv)
    seed_everything(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    teacher = DINOv2Encoder.from_pretrained(
        args.dino_source, variant=args.dino_variant, resolution=args.resolution, input_range="-1_1"
    ).to(device)
    vae = load_vae(args.sd_path, device)
    head = LatentPatchHead(
        teacher.embed_dim, latent_channels=vae.config.latent_channels, hidden=args.hidden, depth=args.depth
    )
    student = LatentDINOv2(teacher, head).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.0)
    step, history = 0, []
    ckpt_path = out / "checkpoint.pt"
    if args.resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: {ckpt_path} does not exist")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        torch.set_rng_state(state["rng"])
        logger.info("resumed at step %d", step)

    ds = ImageDataset(
        find_images(args.data_dir), (args.image_size, args.image_size), augment=True, seed=args.seed
    )
    if len(ds) < args.batch_size:
        raise ValueError(f"{len(ds)} images < --batch_size {args.batch_size}")
    sampler = EpochShuffleSampler(len(ds), seed=args.seed)
    dl = DataLoader(
        ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers, drop_last=True
    )
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")
    scale = vae.config.scaling_factor
    layers = sorted(set(args.layers))

    bar = progress(total=args.max_steps, desc="latent head", unit="step", initial=step)
    epoch = step // len(dl)
    while step < args.max_steps:
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        for batch in dl:
            imgs = batch["image"].to(device)
            with torch.no_grad(), amp:
                target = teacher(imgs, layers=layers or None)
                latents = vae.encode(imgs.to(vae.dtype)).latent_dist.mean * scale
            with amp:
                pred = student(latents.float(), layers=layers or None)
                loss = distill_loss(pred, target, layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            history.append(float(loss.detach()))
            bar.update(1)
            if step % args.log_every == 0:
                bar.set_postfix(loss=f"{history[-1]:.4f}")
                with open(out / "train_log.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "loss": history[-1]}) + "\n")
            if step % args.save_every == 0 or step == args.max_steps:
                student.save_head(out / "latent_dino_head.safetensors")
                torch_save_atomic(
                    {
                        "head": head.state_dict(),
                        "optimizer": opt.state_dict(),
                        "step": step,
                        "history": history,
                        "rng": torch.get_rng_state(),
                    },
                    ckpt_path,
                )
            if step >= args.max_steps:
                break
        epoch += 1
    bar.close()
    logger.info("head saved to %s (final loss %.4f)", out / "latent_dino_head.safetensors", history[-1])
    return history


if __name__ == "__main__":
    main()
