"""MVTec AD for few-shot anomaly generation: layout checks, the few-shot split, paired augmentation.

Layout (as distributed by MVTec)::

    <root>/<class>/train/good/NNN.png
    <root>/<class>/test/<defect>/NNN.png
    <root>/<class>/ground_truth/<defect>/NNN_mask.png

Few-shot split of a defect type (its images sorted by name; no image is in both parts):

* ``official`` (default): the first ``n = N//3``, plus one when ``n % 3 != 0``, images train, the rest are
  held out. This is the rule of the DualAnoDiff / AnomalyDiffusion training code (``n = N // 3; if n % 3:
  n += 1``), e.g. N = 20 -> 6, N = 17 -> 6, N = 10 -> 3.
* ``ceil``: the first ``ceil(N/3)`` train (N = 20 -> 7, N = 10 -> 4). Differs from ``official`` for N in
  1..3 and 6, 10, 11, 12, 15, 19, 20, 21, 24, 28, 29, 30 (N <= 30). N < 3 gives no training image under
  ``official``: an error that names ``ceil``.

Augmentation, as the reference trainers: random horizontal and vertical flips (probability 0.5 each,
``flip="hv"``; the reference code does not flip ``cable``, see :func:`reference_flip`) and a bilinear resize
of the shorter side (``resize_mode="bilinear"``, PIL's resampling, exactly what ``transforms.Resize`` does
on a PIL image), centre crop to a square. ``resize_mode="bicubic_center_crop"`` is this repository's earlier
resize (torch bicubic, antialiased). Flips are drawn from a per-sample seed, so that an image, its mask and
its fg image always get the same flips and a resumed run sees the same flips again. Masks are resized
bilinearly and binarised at 0.5 (``mask >= 0.5``), as the references do.

fg image = the image where the mask is set and a constant background elsewhere: ``grey`` (0 in [-1, 1],
default) is the references' ``normalised image x mask``; ``black`` (-1) is this repository's earlier choice.

A ground-truth mask of another size than its image is an error naming both files, or with
``mask_size_mismatch="resize"`` (``--mask_size_mismatch resize``) first stretched onto the image's pixel grid
(PIL bilinear), so that image and mask are then resized and cropped alike.

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

from utils.cli import UserError
from utils.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_IMAGE_SIZE, UnreadableImageError, read_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLIT_RULES = ("official", "ceil")
FLIP_MODES = ("none", "h", "hv")
RESIZE_MODES = ("bilinear", "bicubic_center_crop")
# fg background value in the [-1, 1] pixel range the model sees
FG_BACKGROUNDS = {"grey": 0.0, "black": -1.0}
MASK_THRESHOLD = 0.5
# A ground-truth mask whose size differs from its image's: an error (default), or mapped onto the image's
# pixel grid first (bilinear resize to the image's size) and then resized and cropped exactly like the image.
MASK_SIZE_MISMATCH = ("error", "resize")
# Classes the reference training code never flips (its transforms for "cable" have no random flips).
REFERENCE_NO_FLIP_CLASSES = ("cable",)


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


def official_train_count(n: int) -> int:
    """Training images of a defect type with N images under the references' rule (``N//3``, +1 if that
    is not a multiple of 3)."""
    k = n // 3
    return k + (1 if k % 3 else 0)


def few_shot_split(
    paths: Sequence[str | os.PathLike], rule: str = "official"
) -> tuple[list[Path], list[Path]]:
    """(train, held_out) of a defect type's images (sorted); see the module docstring for the two rules."""
    if rule not in SPLIT_RULES:
        raise ValueError(f"split rule must be one of {SPLIT_RULES}, got {rule!r}")
    items = sorted(Path(p) for p in paths)
    n = len(items)
    if n == 0:
        raise ValueError("few_shot_split: no images")
    k = official_train_count(n) if rule == "official" else math.ceil(n / 3)
    if k == 0:
        raise ValueError(
            f"few_shot_split: {n} images give no training image under the {rule!r} rule (N//3 = 0); "
            "use --split_rule ceil for defect types with fewer than 3 images"
        )
    return items[:k], items[k:]


def reference_flip(class_name: str) -> str:
    """The flips the reference trainers apply to a class: none for cable, horizontal + vertical otherwise."""
    return "none" if class_name in REFERENCE_NO_FLIP_CLASSES else "hv"


# ---------------------------------------------------------------------------------------------- tensors


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _reference_size(w: int, h: int, resolution: int) -> tuple[int, int]:
    """(w, h) after ``transforms.Resize(resolution)``: shorter side -> resolution, longer side truncated."""
    if w <= h:
        return resolution, int(resolution * h / w)
    return int(resolution * w / h), resolution


def _center_crop(x: torch.Tensor, resolution: int) -> torch.Tensor:
    _, h, w = x.shape
    top, left = (h - resolution) // 2, (w - resolution) // 2
    return x[:, top : top + resolution, left : left + resolution]


class ImageDataError(UserError, ValueError):
    """A training image or mask that cannot be used (unreadable, too large or small, mask of another size):
    found while the data is loaded, before any model; entry points end with its message and exit code 2."""


def _load_image(
    path: Path,
    resolution: int,
    resize_mode: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_IMAGE_SIZE,
) -> torch.Tensor:
    """uint8 [3, R, R]: shorter side resized to R (``resize_mode``), centre crop."""
    from PIL import Image

    _check_choice("resize_mode", resize_mode, RESIZE_MODES)
    try:
        img = read_image(path, "RGB", max_pixels, min_size)
    except UnreadableImageError as err:
        raise ImageDataError(f"cannot read image {err} (fix or remove the file)") from err
    if resize_mode == "bilinear":
        size = _reference_size(*img.size, resolution)
        if size != img.size:
            img = img.resize(size, Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return _center_crop(x, resolution).contiguous()
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return _resize_center_crop(x, resolution, mode="bicubic").round().clamp(0, 255).to(torch.uint8)


def _load_mask(
    path: Path,
    resolution: int,
    resize_mode: str = "bilinear",
    image_path: Path | None = None,
    on_size_mismatch: str = "error",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """bool [1, R, R], binarised at 0.5 after a bilinear resize (PIL's on the 8-bit mask, as the references,
    for ``resize_mode="bilinear"``; torch's on floats for ``bicubic_center_crop``).

    Given ``image_path``, a mask of another size than its image is an error naming both files
    (``on_size_mismatch="error"``), or first stretched to the image's size (``"resize"``) so that the resize
    and crop below cut the same region of both.
    """
    from PIL import Image

    _check_choice("resize_mode", resize_mode, RESIZE_MODES)
    _check_choice("mask size mismatch policy", on_size_mismatch, MASK_SIZE_MISMATCH)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth mask missing: {path}")
    try:
        mask = read_image(path, "L", max_pixels)
    except UnreadableImageError as err:
        raise ImageDataError(f"cannot read mask {err}") from err
    if image_path is not None:
        with Image.open(image_path) as im:  # the header only: the image itself was decoded already
            width, height = im.size
        if (width, height) != mask.size:
            if on_size_mismatch == "error":
                raise ImageDataError(
                    f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is {width}x{height}; "
                    "resize the mask to its image, or pass --mask_size_mismatch resize to stretch it onto the "
                    "image before both are resized and cropped alike"
                )
            mask = mask.resize((width, height), Image.BILINEAR)
    if resize_mode == "bilinear":
        size = _reference_size(*mask.size, resolution)
        if size != mask.size:
            mask = mask.resize(size, Image.BILINEAR)
    x = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
    if resize_mode == "bilinear":
        return _center_crop(x, resolution) >= MASK_THRESHOLD
    return _resize_center_crop(x, resolution, mode="bilinear") >= MASK_THRESHOLD


def _resize_center_crop(x: torch.Tensor, resolution: int, mode: str) -> torch.Tensor:
    _, h, w = x.shape
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if (nh, nw) != (h, w):
        kwargs = {"antialias": True} if mode in ("bilinear", "bicubic") else {}
        x = F.interpolate(x[None], size=(nh, nw), mode=mode, align_corners=False, **kwargs)[0]
    return _center_crop(x, resolution)


def flip_code_for(seed: int, flip: str) -> int:
    """0..3: bit 0 = horizontal flip, bit 1 = vertical flip, drawn from ``seed`` (probability 0.5 each)."""
    _check_choice("flip", flip, FLIP_MODES)
    rng = random.Random(seed)
    h = flip != "none" and rng.random() < 0.5
    v = flip == "hv" and rng.random() < 0.5
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
    ``flip=None`` means the reference's flips for the class (:func:`reference_flip`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        class_name: str,
        resolution: int,
        flip: str | None = None,
        resize_mode: str = "bilinear",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_size: int = DEFAULT_MIN_IMAGE_SIZE,
    ):
        self.flip = reference_flip(class_name) if flip is None else flip
        _check_choice("flip", self.flip, FLIP_MODES)
        _check_choice("resize_mode", resize_mode, RESIZE_MODES)
        self.paths = good_images(root, class_name)
        self.resolution = resolution
        self.images = [_load_image(p, resolution, resize_mode, max_pixels, min_size) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, seed = _split_key(key)
        code = flip_code_for(seed if seed is not None else random.getrandbits(32), self.flip)
        return {"pixel_values": apply_flip(_to_signed(self.images[i]), code), "index": i, "flip": code}


class MVTecAnomalyPairDataset(Dataset):
    """Stage 2: training split of one defect type, as (blend, fg, mask) pairs.

    ``pixel_values`` = the anomalous image, ``fg_values`` = the image where the mask is set and the
    ``fg_background`` value elsewhere (grey = 0, the references' ``image x mask``; black = -1), ``mask`` =
    bool [1,R,R]; all three flipped together. Only the few-shot *train* part of the split is used.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        class_name: str,
        defect: str,
        resolution: int,
        split_rule: str = "official",
        flip: str | None = None,
        resize_mode: str = "bilinear",
        fg_background: str = "grey",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        mask_size_mismatch: str = "error",
        min_size: int = DEFAULT_MIN_IMAGE_SIZE,
    ):
        self.flip = reference_flip(class_name) if flip is None else flip
        _check_choice("flip", self.flip, FLIP_MODES)
        _check_choice("resize_mode", resize_mode, RESIZE_MODES)
        _check_choice("fg_background", fg_background, FG_BACKGROUNDS)
        all_images = defect_images(root, class_name, defect)
        self.paths, self.held_out = few_shot_split(all_images, split_rule)
        self.mask_paths = [mask_path_for(p) for p in self.paths]
        missing = [str(m) for m in self.mask_paths if not m.is_file()]
        if missing:
            raise FileNotFoundError(
                f"ground-truth mask missing: {missing[0]} ({len(missing)} missing in total)"
            )
        self.resolution = resolution
        self.background = FG_BACKGROUNDS[fg_background]
        self.images = [_load_image(p, resolution, resize_mode, max_pixels, min_size) for p in self.paths]
        self.masks = [
            _load_mask(m, resolution, resize_mode, p, mask_size_mismatch, max_pixels)
            for m, p in zip(self.mask_paths, self.paths)
        ]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, seed = _split_key(key)
        code = flip_code_for(seed if seed is not None else random.getrandbits(32), self.flip)
        image = _to_signed(self.images[i])
        mask = self.masks[i]
        fg = torch.where(mask, image, torch.full_like(image, self.background))
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
