"""Tokenize a dataset with an exported DinoVQ tokenizer: every image's code grid into an LMDB cache.

    python preprocessing/extract_dinovq_codes.py --tokenizer outputs/dinovq/dinovq \
        --csv data/imagenet_train.csv --output caches/dinovq_codes --flip
    # 8 parallel jobs (or `accelerate launch` / torchrun: WORLD_SIZE / RANK pick the part)
    python preprocessing/extract_dinovq_codes.py ... --num_shards 8 --shard_index 3

Each image of the sample CSV (``id,img_path,class_id,synset``) gets one record ``[V, H', W']`` of code indices
(``int16`` for codebooks of <= 32768 codes, else ``int32``): view 0 the image, view 1 with ``--flip`` its
horizontal flip (LlamaGen's ``extract_codes_c2i.py`` stores both views unless ``--ten-crop``; ten-crop is not
offered here; docs/dinovq.md lists the deviations). The image goes through the tokenizer's evaluation transform (shorter side resized to cover ``img_size`` with PIL bicubic,
centre crop; train/dinovq/data.py), then ``DinoVQModel.encode_code``. The cache is the repo's LMDB format
(datasets/lmdb_cache.py: per-record checksums, sharded, atomic commits per batch), built by the shared job
machinery (preprocessing/cache_jobs.py): a rerun resumes (cached ids are skipped), ``--num_shards`` jobs write
their own shards of one cache, and a resume with another tokenizer (its weights' SHA-256 is in the metadata)
or other options is refused. Read it with ``datasets.dinovq_codes.DinoVQCodes``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import hashlib
from typing import Any

import torch

from datasets.dinovq_codes import KIND, VIEWS
from models.dinovq import WEIGHTS_FILE, DinoVQModel
from preprocessing.cache_jobs import MODEL_DTYPES, CacheEncoder, TargetStats, add_job_args, run_cli_job
from train.dinovq.data import resize_crop
from utils.cli import run_cli
from utils.images import pil_to_tensor


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class TokenizerTransform:
    """The tokenizer's evaluation transform (picklable for DataLoader workers): centre crop, [-1, 1]."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = tuple(size)

    def __call__(self, image) -> torch.Tensor:
        return pil_to_tensor(resize_crop(image, self.size, None, flip=False), (-1.0, 1.0))


class DinoVQCodeEncoder(CacheEncoder):
    """Images -> ``[B, V, H', W']`` code indices of an exported DinoVQ tokenizer."""

    name = "codes"

    def __init__(
        self,
        tokenizer: str | Path,
        flip: bool = False,
        device: torch.device | str = "cpu",
        model_dtype: str = "float32",
        model: DinoVQModel | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model_dtype = MODEL_DTYPES[model_dtype]
        if model is None:
            model = DinoVQModel.from_pretrained(tokenizer)
        self.model = model.to(self.device).eval()
        self.flip = flip
        self.transform = TokenizerTransform(self.model.img_size)
        views = list(VIEWS[: 2 if flip else 1])
        h, w = self.model.img_size
        weights = Path(tokenizer).expanduser() / WEIGHTS_FILE
        self.metadata: dict[str, Any] = {
            "kind": KIND,
            "tokenizer": str(Path(tokenizer).expanduser().resolve()),
            # what the codes depend on: a resume with other weights is refused (the writer compares metadata)
            "tokenizer_sha256": file_sha256(weights) if weights.is_file() else "in-memory model",
            "codebook_size": int(self.model.codebook_size),
            "grid": list(self.model.grid),
            "img_size": [h, w],
            "patch_size": int(self.model.patch_size),
            "views": views,
            "transform": f"resize shorter side to cover {h}x{w} (PIL bicubic), center crop, [-1, 1]",
            "model_dtype": model_dtype,
            "shape": [len(views), *self.model.grid],
            "dtype": "int16" if self.model.codebook_size <= 32768 else "int32",
        }
        self.out_dtype = torch.int16 if self.metadata["dtype"] == "int16" else torch.int32

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device)
        views = [x, torch.flip(x, dims=[-1])] if self.flip else [x]
        with torch.autocast(
            self.device.type, dtype=self.model_dtype, enabled=self.model_dtype != torch.float32
        ):
            codes = [self.model.encode_code(v) for v in views]
        return torch.stack(codes, dim=1).to(self.out_dtype).cpu()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        help="exported DinoVQ tokenizer folder (config.json + model.safetensors): a run's OUTPUT_DIR/dinovq "
        "or train/dinovq/export.py's output",
    )
    parser.add_argument("--output", required=True, help="code cache directory (created; a rerun resumes it)")
    parser.add_argument(
        "--flip", action="store_true", help="also store the horizontally flipped image's codes (view 1)"
    )
    add_job_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[TargetStats]:
    args = parse_args(argv)

    def make_encoders(device: torch.device) -> list[tuple[DinoVQCodeEncoder, str]]:
        return [(DinoVQCodeEncoder(args.tokenizer, args.flip, device, args.model_dtype), args.output)]

    return run_cli_job(args, make_encoders, "dinovq codes")


if __name__ == "__main__":
    run_cli(main)
