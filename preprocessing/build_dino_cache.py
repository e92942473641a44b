"""Extract L2-normalised DINOv2 patch tokens of images into an LMDB cache (the REPA alignment targets).

    python preprocessing/build_dino_cache.py --csv data/train_200k.csv --output_dir caches/dinov2_vitl14_224 \\
        --dinov2_weights /models/dinov2_vitl14_pretrain.pth --variant vitl14 --resolution 224

DINOv2's official eval transform (resize 256 bicubic, center crop 224, ImageNet mean/std; for another
--resolution r the resize is round(r*256/224)), the final-LayerNorm patch tokens of the repo adapter
(registers excluded), each token L2-normalised in fp32, stored in --dtype. The grid comes from the encoder:
ViT-L/14 at 224 px gives 16x16 = 256 tokens of D=1024, i.e. a [256, 1024] record (512 KiB in fp16).

Resumable (finished ids are skipped) and shardable: run K jobs with `--num_shards K --shard_index i` (or
`accelerate launch --num_processes K ...`) on the same --output_dir; each writes its own LMDB shards and the
cache is the union. To also build the latent cache, use preprocessing/build_caches.py (one decode per image).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing.cache_jobs import TargetStats, single_cache_main
from utils.cli import run_cli


def main(argv: list[str] | None = None) -> list[TargetStats]:
    return single_cache_main("dino", __doc__, argv)


if __name__ == "__main__":
    run_cli(main)
