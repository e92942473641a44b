"""Train and test data of the downstream evaluation, with the checks that turn bad folders into clear errors.

Generated data (what ``eval/generate.py stage2`` writes)::

    <generated_root>/<class>/<defect>/image/NNNN.png     anomalous image
    <generated_root>/<class>/<defect>/mask/NNNN.png      its mask (L, 0/255), same name and size

Test data: for every defect type, the real ``test/<defect>`` images that are *not* in the few-shot training
split of ``datasets.mvtec.few_shot_split`` (the images the generator was trained on are never tested), with
``ground_truth/<defect>/NNN_mask.png``; plus every ``test/good`` image (all-zero mask).

Training items are keyed ``(index, item_seed)`` by :class:`train.core.StepSampler`: every random choice of an
item (normal or anomalous, which defect, which image, the synthetic anomaly) comes from ``item_seed``, so a
resumed run sees the same items as an uninterrupted one.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.mvtec import (
    IMAGE_EXTENSIONS,
    SPLIT_RULES,
    check_class_dir,
    defect_images,
    few_shot_split,
    list_defects,
    mask_path_for,
)
from datasets.mvtec import _load_image as load_image_uint8  # shorter side -> R, centre crop; uint8 [3,R,R]
from datasets.mvtec import _load_mask as load_mask_bool  # same geometry, bilinear, >= 0.5; bool [1,R,R]
from eval.downstream.perlin import paste_anomaly
from utils.cli import UserError
from utils.logging import get_logger

logger = get_logger(__name__)

# The few-shot split rule of the generator's training (datasets/mvtec.py's default, whatever it is).
DEFAULT_SPLIT_RULE: str = inspect.signature(few_shot_split).parameters["rule"].default
GENERATE_HINT = (
    "Generate them with `python eval/generate.py stage2 --mvtec_name {cls} --mvtec_anomaly_name {defect} "
    "--output_root {root} ...` (see docs/anomaly_generation_eval.md), or leave the defect type out with --defects."
)


class DownstreamDataError(UserError, ValueError):
    """A data folder does not hold what the evaluation needs (the message says what and how to fix it)."""


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError) as err:
        raise DownstreamDataError(f"cannot read {path}: {err}") from err


# ---------------------------------------------------------------------------------------------- defects


def resolve_defects(mvtec_root: str | os.PathLike, class_name: str, defects: list[str] | None) -> list[str]:
    """The defect types to evaluate: ``defects`` (checked against the class) or all of the class's."""
    available = list_defects(mvtec_root, class_name)
    if not available:
        raise DownstreamDataError(
            f"class {class_name!r} under {mvtec_root} has no defect types (no test/<defect>/ folder besides good)"
        )
    if not defects:
        return available
    unknown = [d for d in defects if d not in available]
    if unknown:
        raise DownstreamDataError(
            f"--defects {unknown} not found for class {class_name!r}; its defect types are {available}"
        )
    return sorted(dict.fromkeys(defects))


# ---------------------------------------------------------------------------------------------- generated pairs


@dataclass(frozen=True)
class GeneratedPairs:
    defect: str
    images: list[Path]
    masks: list[Path]


def find_generated_pairs(
    generated_root: str | os.PathLike,
    class_name: str,
    defects: list[str],
    max_per_defect: int | None = None,
    need_masks: bool = True,
) -> dict[str, GeneratedPairs]:
    """The generated image/mask pairs of each defect type (sorted by name, the first ``max_per_defect``).

    Errors: a defect type without pairs, an image without its mask (or the reverse), an image and mask of
    different sizes.
    """
    root = Path(generated_root)
    class_dir = root / class_name
    if not class_dir.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise DownstreamDataError(
            f"no generated data for class {class_name!r}: {class_dir} does not exist "
            f"(classes under {root}: {found or 'none'}). "
            + GENERATE_HINT.format(cls=class_name, defect="<defect>", root=root)
        )
    out: dict[str, GeneratedPairs] = {}
    for defect in defects:
        hint = GENERATE_HINT.format(cls=class_name, defect=defect, root=root)
        image_dir, mask_dir = class_dir / defect / "image", class_dir / defect / "mask"
        images = _images_in(image_dir) if image_dir.is_dir() else []
        if not images:
            raise DownstreamDataError(
                f"no generated pairs for defect type {defect!r} of {class_name!r}: expected "
                f"{image_dir}/NNNN.png and {mask_dir}/NNNN.png. {hint}"
            )
        masks = _images_in(mask_dir) if mask_dir.is_dir() else []
        if need_masks:
            by_stem = {m.stem: m for m in masks}
            missing = [p for p in images if p.stem not in by_stem]
            if missing:
                raise DownstreamDataError(
                    f"generated image {missing[0]} has no mask {mask_dir / (missing[0].stem + '.png')} "
                    f"({len(missing)} of {len(images)} images in {image_dir} lack one). Rerun generation "
                    "(it skips complete triplets) or delete the incomplete images."
                )
            image_stems = {p.stem for p in images}
            orphans = [m for m in masks if m.stem not in image_stems]
            if orphans:
                raise DownstreamDataError(
                    f"generated mask {orphans[0]} has no image in {image_dir} ({len(orphans)} such masks)"
                )
            masks = [by_stem[p.stem] for p in images]
        if max_per_defect is not None:
            images = images[:max_per_defect]
            masks = masks[:max_per_defect] if need_masks else masks
        if need_masks:
            for img, msk in zip(images, masks, strict=True):
                si, sm = _image_size(img), _image_size(msk)
                if si != sm:
                    raise DownstreamDataError(
                        f"mask/image size mismatch: {img} is {si[0]}x{si[1]} but its mask {msk} is "
                        f"{sm[0]}x{sm[1]} (width x height). Masks must be pixel-aligned with their images."
                    )
        out[defect] = GeneratedPairs(defect, images, masks if need_masks else [])
    return out


# ---------------------------------------------------------------------------------------------- test set


@dataclass(frozen=True)
class TestItem:
    image: Path
    mask: Path | None  # None for test/good
    defect: str  # "good" or the defect type


def held_out_images(paths: list[Path], rule: str) -> list[Path]:
    """The images of a defect type that the few-shot split does not train on (whatever the rule's overlap)."""
    train, _ = few_shot_split(paths, rule)
    seen = {Path(p) for p in train}
    return [Path(p) for p in sorted(paths) if Path(p) not in seen]


def held_out_test_set(
    mvtec_root: str | os.PathLike, class_name: str, defects: list[str], split_rule: str = DEFAULT_SPLIT_RULE
) -> list[TestItem]:
    """``test/good`` (all) + the held-out images of each defect type, with their ground-truth masks."""
    if split_rule not in SPLIT_RULES:
        raise DownstreamDataError(f"--split_rule must be one of {SPLIT_RULES}, got {split_rule!r}")
    class_dir = check_class_dir(mvtec_root, class_name)
    gt_root = class_dir / "ground_truth"
    if not gt_root.is_dir():
        raise DownstreamDataError(
            f"class {class_name!r} has no ground truth: {gt_root} does not exist. Localization needs the MVTec "
            "AD layout <class>/ground_truth/<defect>/NNN_mask.png (one mask per test/<defect>/NNN.png)."
        )
    good_dir = class_dir / "test" / "good"
    goods = _images_in(good_dir) if good_dir.is_dir() else []
    if not goods:
        raise DownstreamDataError(
            f"no normal test images in {good_dir}: image-level AUROC/AP need test/good images"
        )
    items = [TestItem(p, None, "good") for p in goods]
    for defect in defects:
        held = held_out_images(defect_images(mvtec_root, class_name, defect), split_rule)
        if not held:
            logger.warning(
                "defect %s of %s: every image is in the few-shot training split; none tested",
                defect,
                class_name,
            )
            continue
        for img in held:
            mask = mask_path_for(img)
            if not mask.is_file():
                raise DownstreamDataError(
                    f"class {class_name!r} has no ground truth for {img}: {mask} does not exist "
                    f"(expected one ground_truth/{defect}/<name>_mask.png per test image)"
                )
            si, sm = _image_size(img), _image_size(mask)
            if si != sm:
                raise DownstreamDataError(
                    f"mask/image size mismatch: {img} is {si[0]}x{si[1]} but its ground truth {mask} is "
                    f"{sm[0]}x{sm[1]}"
                )
            items.append(TestItem(img, mask, defect))
    if all(it.mask is None for it in items):
        raise DownstreamDataError(f"class {class_name!r}: no held-out anomalous test image in {defects}")
    return items


def load_test_set(items: list[TestItem], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``[N,3,R,R]`` and bool masks ``[N,R,R]`` of the test items."""
    images = torch.stack([load_image_uint8(it.image, resolution) for it in items])
    masks = torch.stack(
        [
            load_mask_bool(it.mask, resolution)[0]
            if it.mask is not None
            else torch.zeros(resolution, resolution, dtype=torch.bool)
            for it in items
        ]
    )
    return images, masks


# ---------------------------------------------------------------------------------------------- training sets


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def _split_key(key) -> tuple[int, int]:
    if not isinstance(key, tuple):
        raise TypeError("downstream datasets are indexed by (index, item_seed) pairs from StepSampler")
    return int(key[0]), int(key[1])


class GeneratedSegmentationDataset(Dataset):
    """Generated pairs of every defect type + real ``train/good`` images (all-zero mask).

    Item ``(index, seed)``: with probability ``normal_ratio`` a uniformly drawn good image, else a generated
    pair of a uniformly drawn defect type (then a uniformly drawn pair), as the references' data loader.
    Returns ``{"image": [3,R,R] in [0,1], "mask": [1,R,R] in {0,1}}``.
    """

    def __init__(
        self,
        good: list[Path],
        pairs: dict[str, GeneratedPairs],
        resolution: int,
        normal_ratio: float = 0.5,
    ):
        if not 0.0 <= normal_ratio < 1.0:
            raise ValueError(f"--normal_ratio must be in [0, 1), got {normal_ratio}")
        if not pairs:
            raise DownstreamDataError("no generated pairs to train on")
        self.good, self.pairs = list(good), dict(pairs)
        self.defects = sorted(self.pairs)
        self.resolution, self.normal_ratio = resolution, normal_ratio

    def __len__(self) -> int:
        return len(self.good) + sum(len(p.images) for p in self.pairs.values())

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        _, seed = _split_key(key)
        rng = np.random.default_rng(seed)
        r = self.resolution
        if rng.random() < self.normal_ratio:
            image = load_image_uint8(self.good[int(rng.integers(len(self.good)))], r)
            mask = torch.zeros(1, r, r)
        else:
            pairs = self.pairs[self.defects[int(rng.integers(len(self.defects)))]]
            k = int(rng.integers(len(pairs.images)))
            image = load_image_uint8(pairs.images[k], r)
            mask = load_mask_bool(pairs.masks[k], r).float()
        return {"image": _to_unit(image), "mask": mask}


def texture_images(texture_dir: str | os.PathLike) -> list[Path]:
    """Every image under ``texture_dir`` (recursively, e.g. DTD's images/<category>/*.jpg)."""
    root = Path(texture_dir)
    if not root.is_dir():
        raise DownstreamDataError(f"--texture_dir {root} does not exist")
    found = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
        raise DownstreamDataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under --texture_dir {root}")
    return found


class PerlinSegmentationDataset(Dataset):
    """DRAEM's synthetic anomalies on real ``train/good`` images (:mod:`eval.downstream.perlin`).

    Item ``(index, seed)``: a uniformly drawn good image, rotated by U(-90, 90) degrees with probability
    ``rotate_prob`` (DRAEM: 0.3); with probability ``normal_ratio`` returned as is with an all-zero mask,
    else with a Perlin-masked texture pasted in.
    """

    def __init__(
        self,
        good: list[Path],
        textures: list[Path],
        resolution: int,
        normal_ratio: float = 0.5,
        rotate_prob: float = 0.3,
    ):
        if not 0.0 <= normal_ratio < 1.0:
            raise ValueError(f"--normal_ratio must be in [0, 1), got {normal_ratio}")
        if resolution % 32:
            raise ValueError(
                f"--resolution must be a multiple of 32 for the Perlin lattice, got {resolution}"
            )
        self.good, self.textures = list(good), list(textures)
        self.resolution, self.normal_ratio, self.rotate_prob = resolution, normal_ratio, rotate_prob

    def __len__(self) -> int:
        return len(self.good)

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        _, seed = _split_key(key)
        rng = np.random.default_rng(seed)
        r = self.resolution
        image = load_image_uint8(self.good[int(rng.integers(len(self.good)))], r)
        if rng.random() < self.rotate_prob:
            angle = float(rng.uniform(-90, 90))
            image = TF.rotate(image, angle, interpolation=InterpolationMode.BILINEAR, fill=0)
        image = _to_unit(image)
        if rng.random() < self.normal_ratio:
            return {"image": image, "mask": torch.zeros(1, r, r)}
        texture = load_image_uint8(self.textures[int(rng.integers(len(self.textures)))], r)
        image, mask = paste_anomaly(image, texture, rng)
        return {"image": image, "mask": mask}


class MixedSegmentationDataset(Dataset):
    """Generated pairs and Perlin anomalies together (``--source both``).

    Item ``(index, seed)``: with probability ``generated_share`` the item of ``generated`` drawn with a seed
    derived from ``seed``, else the item of ``perlin``; each keeps its own ``normal_ratio``, so the share of
    normal items is theirs (0.5 by default) and the anomalous half is split ``generated_share`` : rest.
    """

    def __init__(
        self,
        generated: GeneratedSegmentationDataset,
        perlin: PerlinSegmentationDataset,
        generated_share: float = 0.5,
    ):
        if not 0.0 < generated_share < 1.0:
            raise ValueError(f"generated_share must be in (0, 1), got {generated_share}")
        self.generated, self.perlin, self.generated_share = generated, perlin, generated_share

    def __len__(self) -> int:
        return len(self.generated) + len(self.perlin)

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index, seed = _split_key(key)
        rng = np.random.default_rng([seed, 7])  # the coin; the chosen dataset gets its own stream
        inner_seed = int(rng.integers(2**62))
        source = self.generated if rng.random() < self.generated_share else self.perlin
        return source[(index, inner_seed)]


class GeneratedClassificationDataset(Dataset):
    """Generated anomalous images labelled by defect type (index into ``defects``, sorted).

    Item ``(index, seed)`` -> ``{"image": [3,R,R] in [0,1], "label": int}``; the sampler's index walks through
    every image once per epoch.
    """

    def __init__(self, pairs: dict[str, GeneratedPairs], resolution: int):
        self.defects = sorted(pairs)
        self.items = [(p, k) for k, d in enumerate(self.defects) for p in pairs[d].images]
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> dict[str, torch.Tensor | int]:
        index, _ = _split_key(key)
        path, label = self.items[index]
        return {"image": _to_unit(load_image_uint8(path, self.resolution)), "label": label}
