"""Build the VAE-latent and DINOv2-token caches in one pass: each image is decoded once and feeds both.

    python preprocessing/build_caches.py --csv data/train_200k.csv \\
        --latent_dir caches/sd15_latents_512 --pretrained_model_name_or_path models/stable-diffusion-v1-5 \\
        --dino_dir caches/dinov2_vitl14_224 --dinov2_weights /models/dinov2_vitl14_pretrain.pth

Giving only --latent_dir (or only --dino_dir) builds that cache alone. The records are the same as those of
encode_vae_latents.py and build_dino_cache.py (same transforms, same metadata), so one-pass and two-pass caches
are interchangeable, and a one-pass run can resume a cache started by the single-cache scripts and vice versa.
An image already in one cache but not the other is decoded once more and only encoded for the missing cache.

Parallel: `--num_shards K --shard_index i` per job, or `accelerate launch --num_processes K
preprocessing/build_caches.py ...` (WORLD_SIZE/RANK are picked up), all on the same output directories.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
from typing import Any

import torch

from preprocessing.cache_jobs import (
    TargetStats,
    add_dino_args,
    add_job_args,
    add_vae_args,
    dino_encoder,
    run_cli_job,
    vae_encoder,
)
from utils.cli import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_job_args(parser)
    parser.add_argument(
        "--latent_dir", default=None, help="VAE latent cache directory (omit to skip latents)."
    )
    parser.add_argument(
        "--dino_dir", default=None, help="DINOv2 token cache directory (omit to skip tokens)."
    )
    vae = parser.add_argument_group("VAE latents")
    add_vae_args(vae, prefix="vae_")
    dino = parser.add_argument_group("DINOv2 tokens")
    add_dino_args(dino, prefix="dino_")
    args = parser.parse_args(argv)
    if not args.latent_dir and not args.dino_dir:
        parser.error("give --latent_dir and/or --dino_dir")
    return args


def main(argv: list[str] | None = None) -> list[TargetStats]:
    args = parse_args(argv)

    def encoders(device: torch.device) -> list[tuple[Any, str]]:
        out: list[tuple[Any, str]] = []
        if args.latent_dir:
            out.append((vae_encoder(args, device, prefix="vae_"), args.latent_dir))
        if args.dino_dir:
            out.append((dino_encoder(args, device, prefix="dino_"), args.dino_dir))
        return out

    return run_cli_job(args, encoders, "caches")


if __name__ == "__main__":
    run_cli(main)
