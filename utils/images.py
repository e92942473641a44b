"""Image I/O helpers: tolerant loading, tensor <-> PIL, PNG grids."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (case-insensitive extension match)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_rgb(path: str | os.PathLike) -> Image.Image | None:
    """Open an image as RGB, fully decoded; ``None`` if the file is missing, truncated or not an image."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None


def to_pil(image: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Image.Image:
    """[C,H,W] tensor in ``value_range`` -> PIL image (RGB, or L for one channel)."""
    if image.ndim != 3:
        raise ValueError(f"to_pil expects [C,H,W], got shape {tuple(image.shape)}")
    lo, hi = value_range
    x = ((image.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    arr = (x.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    if arr.shape[2] == 1:
        return Image.fromarray(arr[:, :, 0], mode="L")
    return Image.fromarray(arr)


def pil_to_tensor(image: Image.Image, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """PIL RGB image -> [3,H,W] float tensor in ``value_range``."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    lo, hi = value_range
    return torch.from_numpy(arr).permute(2, 0, 1) * (hi - lo) + lo


def make_grid_image(
    images: torch.Tensor | Sequence[torch.Tensor | Image.Image],
    nrow: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    padding: int = 2,
) -> Image.Image:
    """Tile images (a [B,C,H,W] tensor or a list of tensors/PIL images of one size) into one picture."""
    pils = [im if isinstance(im, Image.Image) else to_pil(im, value_range) for im in images]
    if not pils:
        raise ValueError("make_grid_image: no images")
    pils = [p.convert("RGB") for p in pils]
    w, h = pils[0].size
    nrow = nrow or math.ceil(math.sqrt(len(pils)))
    rows = math.ceil(len(pils) / nrow)
    grid = Image.new("RGB", (nrow * w + (nrow + 1) * padding, rows * h + (rows + 1) * padding), "white")
    for i, p in enumerate(pils):
        r, c = divmod(i, nrow)
        grid.paste(p.resize((w, h)), (padding + c * (w + padding), padding + r * (h + padding)))
    return grid


def save_image_grid(
    images: torch.Tensor | Sequence[torch.Tensor | Image.Image],
    path: str | os.PathLike,
    nrow: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> Path:
    """Save a PNG grid atomically."""
    from utils.checkpoint import atomic_write

    grid = make_grid_image(images, nrow=nrow, value_range=value_range)
    with atomic_write(path) as tmp:
        grid.save(tmp, format="PNG")
    return Path(path)
