"""Background conditions of DualAnoDiff's background compensation (BCM): an image with its object removed.

Foreground masks come from a salient-object segmenter (U-2-Net in the reference; any segmenter that writes an
8-bit grey image per input, white = object, works). They live in one directory, laid out as the reference's
``condition_dir``::

    <fg_mask_dir>/<class>/<defect>/<image file name>     # one per training image of the defect type
    <fg_mask_dir>/<class>/good/<image file name>         # one per train/good image used at generation

(a mask named ``<image stem>.png`` is accepted too). The background of an image is built exactly as the
reference builds it: the mask is inverted (``255 - m``) and used as the alpha of a paste of the image onto a
black canvas, ``RGB = image * (255 - m) / 255`` (PIL's ``paste`` with an "L" mask, so a soft saliency map
gives a soft cut-out), at the image's full size; then the same resize and crop as the image, and in training
the image's random flips.

Training pairs: :class:`BackgroundPairDataset` adds ``condition_values`` ([-1, 1], flipped with the pair).
Generation (the reference's ``inference_test_tempt.py``): the first third (``N // 3``, at least 1) of the
sorted ``good`` masks give the backgrounds; sample ``i`` uses background ``(i // every) % n``, ``every`` = 50
(10 for screw).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.mvtec import (
    IMAGE_EXTENSIONS,
    RESIZE_MODES,
    _center_crop,
    _check_choice,
    _reference_size,
    _resize_center_crop,
    _to_signed,
    apply_flip,
    check_class_dir,
)
from utils.images import DEFAULT_MAX_PIXELS, UnreadableImageError, read_image

# the reference's inference: a new background every 50 samples (every 10 for screw)
REFERENCE_BACKGROUND_EVERY = {"screw": 10}
DEFAULT_BACKGROUND_EVERY = 50
HOW_TO_MAKE_MASKS = (
    "make them with a salient-object segmenter (the reference uses U-2-Net: one 8-bit grey PNG per image, white "
    "= object) and store them as <fg_mask_dir>/<class>/<defect or good>/<image file name>; see "
    "docs/anomaly_training.md, 'Background compensation (BCM)'"
)


def fg_mask_path(fg_mask_dir: str | os.PathLike, class_name: str, subdir: str, image_path: Path) -> Path:
    """Where the foreground mask of ``image_path`` is (the same file name, or its stem + ``.png``)."""
    folder = Path(fg_mask_dir) / class_name / subdir
    same = folder / Path(image_path).name
    if same.is_file():
        return same
    png = folder / f"{Path(image_path).stem}.png"
    return png if png.is_file() else same


def check_fg_masks(
    fg_mask_dir: str | os.PathLike, class_name: str, subdir: str, image_paths: list[Path]
) -> list[Path]:
    """Mask paths of ``image_paths``; one ``FileNotFoundError`` naming every missing mask."""
    masks = [fg_mask_path(fg_mask_dir, class_name, subdir, p) for p in image_paths]
    missing = [str(m) for m in masks if not m.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in total)" if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"background compensation: {len(missing)} foreground mask(s) missing in --bcm_fg_mask_dir "
            f"{fg_mask_dir}: {shown}; {HOW_TO_MAKE_MASKS}"
        )
    return masks


def background_image(image_path: Path, mask_path: Path, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The reference's background of an image (PIL RGB, full size): the image pasted through ``255 - mask``."""
    from PIL import Image

    try:
        image = read_image(image_path, "RGB", max_pixels)
        mask = read_image(mask_path, "L", max_pixels)
    except UnreadableImageError as err:
        raise ValueError(f"background compensation: cannot read {err}") from err
    if mask.size != image.size:
        raise ValueError(
            f"foreground mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
            f"{image.size[0]}x{image.size[1]}; write the masks at the images' size"
        )
    canvas = Image.new("RGBA", image.size)
    canvas.paste(image, mask=Image.eval(mask, lambda p: 255 - p))
    return canvas.convert("RGB")


def load_background(
    image_path: Path,
    mask_path: Path,
    resolution: int,
    resize_mode: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """uint8 [3, R, R]: :func:`background_image` resized and cropped as ``datasets.mvtec`` resizes images."""
    from PIL import Image

    _check_choice("resize_mode", resize_mode, RESIZE_MODES)
    img = background_image(image_path, mask_path, max_pixels)
    if resize_mode == "bilinear":
        size = _reference_size(*img.size, resolution)
        if size != img.size:
            img = img.resize(size, Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return _center_crop(x, resolution).contiguous()
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return _resize_center_crop(x, resolution, mode="bicubic").round().clamp(0, 255).to(torch.uint8)


class BackgroundPairDataset(Dataset):
    """A :class:`datasets.mvtec.MVTecAnomalyPairDataset` whose items also hold ``condition_values``: the
    background of the pair's image in [-1, 1], with the pair's flips."""

    def __init__(
        self,
        pairs: Dataset,
        fg_mask_dir: str | os.PathLike,
        class_name: str,
        defect: str,
        resolution: int,
        resize_mode: str = "bilinear",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.pairs = pairs
        self.mask_paths = check_fg_masks(fg_mask_dir, class_name, defect, list(pairs.paths))
        self.backgrounds = [
            load_background(p, m, resolution, resize_mode, max_pixels)
            for p, m in zip(pairs.paths, self.mask_paths)
        ]

    def __getattr__(self, name: str):  # paths, held_out, flip, ... of the wrapped dataset
        if name == "pairs":
            raise AttributeError(name)
        return getattr(self.pairs, name)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key):
        item = self.pairs[key]
        item["condition_values"] = apply_flip(_to_signed(self.backgrounds[item["index"]]), item["flip"])
        return item


def good_background_paths(
    root: str | os.PathLike, class_name: str, fg_mask_dir: str | os.PathLike
) -> list[tuple[Path, Path]]:
    """(train/good image, its mask) of the reference's generation backgrounds: the first ``N // 3`` (at least
    one) of the N sorted masks in ``<fg_mask_dir>/<class>/good``; errors name what is missing."""
    mask_dir = Path(fg_mask_dir) / class_name / "good"
    masks = (
        sorted(p for p in mask_dir.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if mask_dir.is_dir()
        else []
    )
    if not masks:
        raise FileNotFoundError(
            f"background compensation: no foreground masks of good images in {mask_dir} (generation draws its "
            f"backgrounds from <class>/train/good); {HOW_TO_MAKE_MASKS}"
        )
    masks = masks[: max(1, len(masks) // 3)]
    good_dir = check_class_dir(root, class_name) / "train" / "good"
    pairs, missing = [], []
    for m in masks:
        candidates = [good_dir / m.name] + [good_dir / f"{m.stem}{ext}" for ext in IMAGE_EXTENSIONS]
        image = next((c for c in candidates if c.is_file()), None)
        if image is None:
            missing.append(str(good_dir / m.name))
        else:
            pairs.append((image, m))
    if missing:
        raise FileNotFoundError(
            f"background compensation: {len(missing)} good image(s) named by the masks in {mask_dir} are missing: "
            f"{', '.join(missing[:5])}"
        )
    return pairs


def background_every(class_name: str, every: int | None = None) -> int:
    """How many consecutive samples share a background (the reference's: 50, screw 10)."""
    value = (
        every if every is not None else REFERENCE_BACKGROUND_EVERY.get(class_name, DEFAULT_BACKGROUND_EVERY)
    )
    if value < 1:
        raise ValueError(f"background period must be >= 1, got {value}")
    return value


def background_index(sample_index: int, num_backgrounds: int, every: int) -> int:
    """The background of sample ``i``: ``(i // every) % n`` (the reference's rotation, started at sample 0)."""
    return (sample_index // every) % num_backgrounds


def load_good_backgrounds(
    root: str | os.PathLike,
    class_name: str,
    fg_mask_dir: str | os.PathLike,
    resolution: int,
    resize_mode: str = "bilinear",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[torch.Tensor]:
    """The generation backgrounds (:func:`good_background_paths`) as uint8 [3, R, R] tensors."""
    return [
        load_background(image, mask, resolution, resize_mode, max_pixels)
        for image, mask in good_background_paths(root, class_name, fg_mask_dir)
    ]
