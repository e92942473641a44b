"""MVTec AD for few-shot anomaly generation: layout checks, the few-shot split, paired augmentation.

Layout (as distributed by MVTec)::

    <root>/<class>/train/good/NNN.png
    <root>/<class>/test/<defect>/NNN.png
    <root>/<class>/ground_truth/<defect>/NNN_mask.png

Few-shot split of a defect type: its images sorted by name; the first ``ceil(N/3)`` train, the rest are
held out (``rule="ceil"``, the default; no image is in both). ``rule="original"`` reproduces the original
DualAnoDiff/AnomalyDiffusion code: train = the first ``N//3 (+1 if N%3)`` images, held out = everything
from index ``N//3`` on, so when ``N % 3 != 0`` the last training image is also held out (overlap of one).
Keep it only to compare with numbers published with that code.

Augmentation: random horizontal (and optionally vertical) flips drawn from a per-sample seed, so that an
image, its mask and its fg crop always get the same flips and a resumed run sees the same flips again.
Masks are resized bilinearly and binarised at 0.5 (``mask >= 0.5``). A mask of another size than its image is
an error naming both files, or with ``mask_size_mismatch="resize"`` (``--mask_size_mismatch resize``) first
stretched onto the image's pixel grid, so that image and mask are resized and cropped alike.

Reading: 16-bit images and masks are scaled to 8 bits (never clipped; utils/images.py); an unreadable image,
including one whose header claims more than ``max_pixels`` pixels (``--max_image_pixels``, a decompression-bomb
guard), is an error naming the file: a few-shot set has no image to spare.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from utils.images import DEFAULT_MAX_PIXELS, UnreadableImageError, read_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLIT_RULES = ("ceil", "original")
FLIP_MODES = ("none", "horizontal", "both")
MASK_THRESHOLD = 0.5
# A ground-truth mask whose size differs from its image's: an error (default), or mapped onto the image's
# pixel grid first (bilinear resize to the image's size) and then resized and cropped exactly like the image.
MASK_SIZE_MISMATCH = ("error", "resize")


# ---------------------------------------------------------------------------------------------- layout


def _subdirs(path: Path) -> list[str]:
    return (
        sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if path.is_dir()
        else []
    )


def _images_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def check_class_dir(root: str | os.PathLike, class_name: str) -> Path:
    """``<root>/<class_name>``, or an error listing the classes that exist under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"MVTec AD root {root} does not exist. Download MVTec AD and pass its extracted root "
            "(the folder holding bottle/, cable/, hazelnut/, ...), or build the synthetic one with "
            "`python preprocessing/make_tiny_assets.py --out .cache/tiny` (root .cache/tiny/mvtec)."
        )
    class_dir = root / class_name
    if not class_dir.is_dir():
        raise FileNotFoundError(
            f"MVTec class {class_name!r} not found under {root}; classes there: {_subdirs(root) or 'none'}"
        )
    return class_dir


def list_defects(root: str | os.PathLike, class_name: str) -> list[str]:
    """Defect types of a class (``test/`` subfolders except ``good``)."""
    class_dir = check_class_dir(root, class_name)
    return [d for d in _subdirs(class_dir / "test") if d != "good"]


def good_images(root: str | os.PathLike, class_name: str) -> list[Path]:
    """Sorted ``train/good`` images of a class (error if there are none)."""
    good_dir = check_class_dir(root, class_name) / "train" / "good"
    if not good_dir.is_dir():
        raise FileNotFoundError(f"{good_dir} does not exist (expected <root>/<class>/train/good/)")
    images = _images_in(good_dir)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {good_dir}")
    return images


def defect_images(root: str | os.PathLike, class_name: str, defect: str) -> list[Path]:
    """Sorted ``test/<defect>`` images (error listing the defect types if ``defect`` does not exist)."""
    class_dir = check_class_dir(root, class_name)
    defect_dir = class_dir / "test" / defect
    if defect == "good" or not defect_dir.is_dir():
        raise FileNotFoundError(
            f"defect type {defect!r} not found for class {class_name!r} (looked for {defect_dir}); "
            f"defect types there: {list_defects(root, class_name) or 'none'}"
        )
    images = _images_in(defect_dir)
    if not images:
        raise FileNotFoundError(f"no images in {defect_dir}")
    return images


def mask_path_for(image_path: str | os.PathLike) -> Path:
    """``<class>/test/<defect>/NNN.png`` -> ``<class>/ground_truth/<defect>/NNN_mask.png``.

    Built from the path's last parts (never by replacing "test" anywhere in the string, which breaks on
    roots such as ``/data/test_sets/mvtec``).
    """
    image_path = Path(image_path)
    defect_dir = image_path.parent
    if defect_dir.parent.name != "test":
        raise ValueError(f"{image_path} is not inside <class>/test/<defect>/")
    class_dir = defect_dir.parent.parent
    return class_dir / "ground_truth" / defect_dir.name / f"{image_path.stem}_mask.png"


def few_shot_split(paths: Sequence[str | os.PathLike], rule: str = "ceil") -> tuple[list[Path], list[Path]]:
    """(train, held_out) of a defect type's images; see the module docstring for the two rules."""
    if rule not in SPLIT_RULES:
        raise ValueError(f"split rule must be one of {SPLIT_RULES}, got {rule!r}")
    items = sorted(Path(p) for p in paths)
    n = len(items)
    if n == 0:
        raise ValueError("few_shot_split: no images")
    if rule == "ceil":
        k = math.ceil(n / 3)
        return items[:k], items[k:]
    k = n // 3 + (1 if n % 3 else 0)
    return items[:k], items[n // 3 :]


# ---------------------------------------------------------------------------------------------- tensors


def _load_image(path: Path, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """uint8 [3, R, R]: shorter side resized to R (bicubic, antialiased), centre crop."""
    try:
        img = read_image(path, "RGB", max_pixels)
    except UnreadableImageError as err:
        raise ValueError(f"cannot read image {err} (fix or remove the file)") from err
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return _resize_center_crop(x, resolution, mode="bicubic").round().clamp(0, 255).to(torch.uint8)


def _load_mask(
    path: Path,
    resolution: int,
    image_path: Path | None = None,
    on_size_mismatch: str = "error",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """bool [1, R, R], binarised at 0.5 after a bilinear resize with the geometry of ``image_path``'s image.

    A mask of another size than its image is an error naming both files (``on_size_mismatch="error"``), or
    first resized to the image's size (``"resize"``) so that the crop below cuts the same region of both.
    """
    from PIL import Image

    if on_size_mismatch not in MASK_SIZE_MISMATCH:
        raise ValueError(
            f"mask size mismatch policy must be one of {MASK_SIZE_MISMATCH}, got {on_size_mismatch!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth mask missing: {path}")
    try:
        mask = read_image(path, "L", max_pixels)
    except UnreadableImageError as err:
        raise ValueError(f"cannot read mask {err}") from err
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
    if image_path is not None:
        with Image.open(image_path) as im:  # the header only: the image itself was decoded already
            width, height = im.size
        if (width, height) != mask.size:
            if on_size_mismatch == "error":
                raise ValueError(
                    f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is {width}x{height}; "
                    "resize the mask to its image, or pass --mask_size_mismatch resize to stretch it onto the "
                    "image before both are resized and cropped alike"
                )
            m = F.interpolate(
                m[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True
            )[0]
    x = _resize_center_crop(m, resolution, mode="bilinear")
    return x >= MASK_THRESHOLD


def _resize_center_crop(x: torch.Tensor, resolution: int, mode: str) -> torch.Tensor:
    _, h, w = x.shape
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if (nh, nw) != (h, w):
        kwargs = {"antialias": True} if mode in ("bilinear", "bicubic") else {}
        x = F.interpolate(x[None], size=(nh, nw), mode=mode, align_corners=False, **kwargs)[0]
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return x[:, top : top + resolution, left : left + resolution]


def flip_code_for(seed: int, flip: str) -> int:
    """0..3: bit 0 = horizontal flip, bit 1 = vertical flip, drawn from ``seed`` (probability 0.5 each)."""
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    rng = random.Random(seed)
    h = flip != "none" and rng.random() < 0.5
    v = flip == "both" and rng.random() < 0.5
    return int(h) | (int(v) << 1)


def apply_flip(x: torch.Tensor, code: int) -> torch.Tensor:
    if code & 1:
        x = x.flip(-1)
    if code & 2:
        x = x.flip(-2)
    return x


def _to_signed(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def _split_key(key: int | tuple[int, int]) -> tuple[int, int | None]:
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), None


# ---------------------------------------------------------------------------------------------- datasets


class MVTecGoodDataset(Dataset):
    """Stage 1: a class's ``train/good`` images in [-1, 1].

    Items: ``{"pixel_values": [3,R,R], "index": i, "flip": code}``. A key ``(i, aug_seed)`` draws the flips
    from ``aug_seed`` (what the trainer's sampler passes); a plain ``i`` draws them from Python's RNG.
    Images are decoded and resized once at construction (few-shot sets are small; bad files fail early).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        class_name: str,
        resolution: int,
        flip: str = "horizontal",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        if flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
        self.paths = good_images(root, class_name)
        self.flip = flip
        self.resolution = resolution
        self.images = [_load_image(p, resolution, max_pixels) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, seed = _split_key(key)
        code = flip_code_for(seed if seed is not None else random.getrandbits(32), self.flip)
        return {"pixel_values": apply_flip(_to_signed(self.images[i]), code), "index": i, "flip": code}


class MVTecAnomalyPairDataset(Dataset):
    """Stage 2: training split of one defect type, as (blend, fg, mask) pairs.

    ``pixel_values`` = the anomalous image, ``fg_values`` = image x mask (black, i.e. -1, elsewhere), ``mask``
    = bool [1,R,R]; all three flipped together. Only the few-shot *train* part of the split is used.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        class_name: str,
        defect: str,
        resolution: int,
        split_rule: str = "ceil",
        flip: str = "horizontal",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        mask_size_mismatch: str = "error",
    ):
        if flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
        all_images = defect_images(root, class_name, defect)
        self.paths, self.held_out = few_shot_split(all_images, split_rule)
        self.mask_paths = [mask_path_for(p) for p in self.paths]
        missing = [str(m) for m in self.mask_paths if not m.is_file()]
        if missing:
            raise FileNotFoundError(
                f"ground-truth mask missing: {missing[0]} ({len(missing)} missing in total)"
            )
        self.flip = flip
        self.resolution = resolution
        self.images = [_load_image(p, resolution, max_pixels) for p in self.paths]
        self.masks = [
            _load_mask(m, resolution, p, mask_size_mismatch, max_pixels)
            for m, p in zip(self.mask_paths, self.paths)
        ]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, seed = _split_key(key)
        code = flip_code_for(seed if seed is not None else random.getrandbits(32), self.flip)
        image = _to_signed(self.images[i])
        mask = self.masks[i]
        fg = torch.where(mask, image, torch.full_like(image, -1.0))
        return {
            "pixel_values": apply_flip(image, code),
            "fg_values": apply_flip(fg, code),
            "mask": apply_flip(mask, code),
            "index": i,
            "flip": code,
        }


def collate(batch: list[dict]) -> dict:
    out = {}
    for k in batch[0]:
        vals = [b[k] for b in batch]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else torch.tensor(vals)
    return out
