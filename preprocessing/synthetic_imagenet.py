"""Procedural ImageNet look-alike in the Kaggle ILSVRC CLS-LOC layout (val sorted into class folders).

    <root>/ILSVRC/Data/CLS-LOC/train/<synset>/<synset>_<n>.JPEG
    <root>/ILSVRC/Data/CLS-LOC/val/<synset>/ILSVRC2012_val_<8 digits>.JPEG
    <root>/LOC_synset_mapping.txt          ("<synset> <names>" per line, like Kaggle's)
    <root>/imagenet_class_index.json       ({"<index>": ["<synset>", "<name>"]}, torchvision's format)

Five real synsets with their real ImageNet-1k indices 0..4. Each class has its own hue and shape so a
classifier or a feature extractor can tell them apart. One train file is deliberately corrupt (a JPEG cut
in half, `CORRUPT_FILE_NAME` in class 0) so corrupt-image handling can be tested.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Real ImageNet-1k indices, synsets and torchvision class_index names.
IMAGENET_CLASSES: tuple[tuple[str, str], ...] = (
    ("n01440764", "tench"),
    ("n01443537", "goldfish"),
    ("n01484850", "great_white_shark"),
    ("n01491361", "tiger_shark"),
    ("n01494475", "hammerhead"),
)
_HUES = ((200, 60, 50), (230, 170, 40), (60, 90, 200), (60, 170, 80), (160, 70, 190))
_SHAPES = ("circle", "square", "triangle", "stripes", "cross")
CORRUPT_FILE_NAME = f"{IMAGENET_CLASSES[0][0]}_99999.JPEG"


def render_image(class_index: int, key: int, size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng([seed, class_index, key, size])
    hue = np.array(_HUES[class_index], np.float32)
    bg = np.clip(hue * 0.35 + rng.normal(0, 12, 3) + rng.normal(0, 8, (size, size, 3)), 0, 255)
    img = Image.fromarray(bg.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    fg = tuple(int(c) for c in np.clip(hue + rng.normal(0, 15, 3), 0, 255))
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.18, 0.3) * size
    shape = _SHAPES[class_index]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif shape == "stripes":
        step = max(4, size // 8)
        for x0 in range(int(rng.integers(step)), size, step):
            draw.rectangle([x0, 0, x0 + step // 2 - 1, size], fill=fg)
    else:
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
    return img


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_class_index(path: Path, classes=IMAGENET_CLASSES) -> Path:
    mapping = {str(i): [synset, name] for i, (synset, name) in enumerate(classes)}
    Path(path).write_text(json.dumps(mapping, indent=1) + "\n")
    return Path(path)


def write_synthetic_imagenet(
    root: Path, size: int = 64, train_per_class: int = 12, val_per_class: int = 4, seed: int = 0
) -> dict[str, Path]:
    """Write the dataset; returns {"imagenet": root, "imagenet_classes": json, "imagenet_corrupt": file}."""
    root = Path(root)
    cls_loc = root / "ILSVRC" / "Data" / "CLS-LOC"
    val_counter = 1
    for ci, (synset, _) in enumerate(IMAGENET_CLASSES):
        train_dir, val_dir = cls_loc / "train" / synset, cls_loc / "val" / synset
        train_dir.mkdir(parents=True, exist_ok=True)
        val_dir.mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class):
            (train_dir / f"{synset}_{i + 1}.JPEG").write_bytes(_jpeg_bytes(render_image(ci, i, size, seed)))
        for i in range(val_per_class):
            img = render_image(ci, 10_000 + i, size, seed)
            (val_dir / f"ILSVRC2012_val_{val_counter:08d}.JPEG").write_bytes(_jpeg_bytes(img))
            val_counter += 1
    # A real-looking JPEG cut in half: PIL opens the header but fails on load() ("image file is truncated").
    corrupt = cls_loc / "train" / IMAGENET_CLASSES[0][0] / CORRUPT_FILE_NAME
    full = _jpeg_bytes(render_image(0, 99_999, size, seed))
    corrupt.write_bytes(full[: len(full) // 2])
    lines = [f"{synset} {name.replace('_', ' ')}" for synset, name in IMAGENET_CLASSES]
    (root / "LOC_synset_mapping.txt").write_text("\n".join(lines) + "\n")
    classes_json = write_class_index(root / "imagenet_class_index.json")
    return {"imagenet": root, "imagenet_classes": classes_json, "imagenet_corrupt": corrupt}
