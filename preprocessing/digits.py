"""Real handwritten digits on every machine: scikit-learn's bundled `load_digits` (UCI optdigits test set).

1,797 grey 8x8 images (values 0..16) of the digits 0-9, written upsampled (bicubic) to `size` px RGB PNGs in an
ImageFolder layout, with a fixed split (every 6th image is held out: 300 test / 1,497 train):

    <root>/{train,test}/<digit>/<index:04d>.png

Prompts name the class in words ("a photo of the digit three"), so the stand-in text encoder sees ordinary
CLIP tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
HOLDOUT_EVERY = 6


def digit_prompt(label: int) -> str:
    return f"a photo of the digit {DIGIT_WORDS[label]}"


def load_digit_arrays(split: str, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, size, size, 3], labels int64 [N]) of the split ("train", "test" or "all")."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    bunch = load_digits()
    raw = (bunch.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    index = np.arange(len(raw))
    keep = {"all": index >= 0, "test": index % HOLDOUT_EVERY == 0, "train": index % HOLDOUT_EVERY != 0}[split]
    images = np.stack(
        [np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC)) for img in raw[keep]]
    )
    return np.repeat(images[..., None], 3, axis=-1), bunch.target[keep].astype(np.int64)


def write_digits(root: Path, size: int = 64) -> Path:
    """Write both splits as PNGs under root (ImageFolder layout); returns root."""
    root = Path(root)
    for split in ("train", "test"):
        images, labels = load_digit_arrays(split, size)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / str(int(label))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


def sklearn_sample_crops(count: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Random `size` px crops (uint8 [count, size, size, 3]) of scikit-learn's two bundled photos
    (`load_sample_images`: china.jpg, flower.jpg), halved first so a crop holds more than one texture."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [
        np.asarray(Image.fromarray(img).resize((img.shape[1] // 2, img.shape[0] // 2), Image.BICUBIC))
        for img in load_sample_images().images
    ]
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        y = int(rng.integers(0, photo.shape[0] - size + 1))
        x = int(rng.integers(0, photo.shape[1] - size + 1))
        crops.append(photo[y : y + size, x : x + size])
    return np.stack(crops)
