"""Encode images into an LMDB cache of Stable Diffusion VAE latents (scaled, ready for the U-Net).

    python preprocessing/encode_vae_latents.py --csv data/train_200k.csv --output_dir caches/sd15_latents_512 \\
        --pretrained_model_name_or_path models/stable-diffusion-v1-5 --resolution 512 --dtype float16

Each image: shorter side resized to --resolution (bicubic), center crop, [-1, 1], VAE posterior. The record is
`scaling_factor * (mean - shift_factor)` as [4, res/8, res/8] (the posterior mean: deterministic, so a resumed or
re-run cache is bit-identical), or with --store_moments [2, 4, res/8, res/8] = (scaled mean, scaled std) so the
dataset can draw `mean + std * eps`. Either way `SD15AlignedDataset` returns the scaled latent the U-Net expects.

Resumable (finished ids are skipped) and shardable: run K jobs with `--num_shards K --shard_index i` (or
`accelerate launch --num_processes K ...`) on the same --output_dir; each writes its own LMDB shards and the
cache is the union. To also build the DINO cache, use preprocessing/build_caches.py (one decode per image).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing.cache_jobs import TargetStats, single_cache_main
from utils.cli import run_cli


def main(argv: list[str] | None = None) -> list[TargetStats]:
    return single_cache_main("vae", __doc__, argv)


if __name__ == "__main__":
    run_cli(main)
