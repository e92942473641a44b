"""Image data for the DinoVQ trainer: an image folder, an ImageNet tree, or an ImageNet subset CSV.

Every sample has an id (the key of the DINO-token LMDB cache when one is used):
* folder / ImageNet tree: the image path relative to the root, without extension, '/'-separated
  (e.g. ``n01440764/n01440764_10026``);
* CSV (``id,img_path,class_id,synset``): the ``id`` column; ``img_path`` is relative to the CSV's directory
  unless absolute.

Augmentation (resize shorter side + random crop + horizontal flip) is seeded by (seed, epoch, index) so that a
resumed run sees exactly the images and crops of an uninterrupted one. With a DINO cache the crop must match the
cached tokens, so the trainer switches to the deterministic center crop.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from utils.images import (
    DEFAULT_MIN_IMAGE_SIZE,
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    pil_to_tensor,
    read_image,
)
from utils.logging import get_logger

logger = get_logger(__name__)


def find_images(root: str | os.PathLike) -> list[tuple[str, Path]]:
    """(id, path) of every image under ``root`` (recursive, sorted); an ImageNet root uses its train split."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    imagenet_train = root / "ILSVRC" / "Data" / "CLS-LOC" / "train"
    if imagenet_train.is_dir():
        root = imagenet_train
    items = [
        (p.relative_to(root).with_suffix("").as_posix(), p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    if not items:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return items


def read_subset_csv(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """(id, path) rows of an ImageNet subset CSV with header ``id,img_path,class_id,synset``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subset CSV not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"id", "img_path"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(
                f"{path}: missing columns {sorted(missing)} (expected id,img_path,class_id,synset)"
            )
        rows = []
        for row in reader:
            p = Path(row["img_path"])
            rows.append((row["id"], p if p.is_absolute() else path.parent / p))
    if not rows:
        raise ValueError(f"{path} lists no images")
    return rows


def resize_crop(
    img: Image.Image, size: tuple[int, int], rng: random.Random | None, flip: bool
) -> Image.Image:
    """Resize the shorter side to cover ``size`` (bicubic), crop (random if ``rng`` else center), maybe flip."""
    h, w = size
    scale = max(h / img.height, w / img.width)
    nw, nh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    if rng is None:
        left, top = (nw - w) // 2, (nh - h) // 2
    else:
        left, top = rng.randint(0, nw - w), rng.randint(0, nh - h)
    img = img.crop((left, top, left + w, top + h))
    if flip and rng is not None and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


class ImageDataset(Dataset):
    """``{"image": [3,H,W] in [-1,1], "id": str}``; unreadable images are replaced by the next readable one."""

    def __init__(
        self,
        items: list[tuple[str, Path]],
        size: tuple[int, int],
        augment: bool = True,
        seed: int = 0,
        min_size: int = DEFAULT_MIN_IMAGE_SIZE,
    ):
        if not items:
            raise ValueError("ImageDataset: no images")
        self.min_size = int(min_size)
        self.items = items
        self.size = tuple(size)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.items)):
            key, path = self.items[(index + offset) % len(self.items)]
            try:
                img = read_image(path, "RGB", min_size=self.min_size)
                break
            except UnreadableImageError as err:  # named with its reason (too small, truncated, ...)
                logger.warning("skipping unusable image %s", err)
        else:
            raise RuntimeError("ImageDataset: none of the images can be read")
        rng = random.Random(hash((self.seed, self.epoch, index))) if self.augment else None
        img = resize_crop(img, self.size, rng, flip=self.augment)
        return {"image": pil_to_tensor(img, (-1.0, 1.0)), "id": key}


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with ``torch.randperm`` seeded by (seed, epoch): reproducible order across resumes."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def split_holdout(
    items: list[tuple[str, Path]], val_size: int
) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """Hold out every k-th item (deterministic, spread over classes) as the evaluation set."""
    if val_size <= 0:
        return items, []
    if val_size >= len(items):
        raise ValueError(f"data.val_size={val_size} leaves no training images (only {len(items)} found)")
    step = len(items) / val_size
    val_idx = {int(i * step) for i in range(val_size)}
    return [x for i, x in enumerate(items) if i not in val_idx], [items[i] for i in sorted(val_idx)]
