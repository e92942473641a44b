"""Image I/O helpers: tolerant loading, tensor <-> PIL, PNG grids."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

# Pixel limit of the image readers (``--max_image_pixels`` of the cache builders and the anomaly trainers).
# PIL's own default (89.5 megapixels, ~9459x9459): far above ImageNet (~0.2 MP) and MVTec AD (<= 1 MP), far
# below what a forged header (20000x20000 = 400 MP) would make the decoder allocate.
DEFAULT_MAX_PIXELS = 89_478_485

# Smallest shorter side (pixels) of a *training* image (``--min_image_size`` of the anomaly trainers and the
# cache builders, ``data.min_image_size`` of DinoVQ). Below it an image is refused with its path: a 1x1 image
# resized to 512 px is a flat colour, not a photo of the object. 16 px is far below every real dataset used
# here (MVTec AD >= 700 px, ImageNet >= ~20 px) and keeps the tiny test assets (16-64 px) usable.
DEFAULT_MIN_IMAGE_SIZE = 16

# Modes converted with PIL's own ``convert`` (8 bits per channel; colour spaces with a defined RGB mapping).
_PIL_CONVERTIBLE = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)
# 16-bit grayscale (PNG, TIFF): PIL's ``convert`` clips these at 255 instead of scaling them.
_GRAY16 = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
SUPPORTED_MODES = tuple(sorted(_PIL_CONVERTIBLE | _GRAY16 | {"I"}))


class UnreadableImageError(ValueError):
    """An image file that cannot be used; ``path`` and ``reason`` are kept for reports (``str()`` has both)."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (case-insensitive extension match)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def to_8bit(image: Image.Image, mode: str = "RGB", source_format: str | None = None) -> Image.Image:
    """``image`` as 8-bit ``mode`` ("RGB" or "L"), scaling 16-bit pixels instead of clipping them.

    16-bit grayscale (``I;16*``, and ``I`` from a PNG, whose samples are at most 16 bits) keeps its high
    byte (``v >> 8``), as PIL itself does for 16-bit RGB PNGs (``RGB;16B``): 0 -> 0, 256 -> 1, 65535 -> 255.
    Other modes in ``SUPPORTED_MODES`` go through PIL's ``convert`` (alpha dropped, CMYK/YCbCr/LAB/HSV
    mapped to RGB). 32-bit ``I`` from other formats and float ``F`` have no defined 8-bit range: an error.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"to_8bit: mode must be 'RGB' or 'L', got {mode!r}")
    if image.mode in _GRAY16 or (image.mode == "I" and source_format == "PNG"):
        high = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
        gray = Image.fromarray(high, mode="L")
        return gray if mode == "L" else gray.convert("RGB")
    if image.mode not in _PIL_CONVERTIBLE:
        raise ValueError(
            f"unsupported pixel mode {image.mode!r} (no defined 8-bit range; supported: "
            f"{', '.join(SUPPORTED_MODES)}): save the image as an 8- or 16-bit PNG or a JPEG"
        )
    return image.convert(mode)  # a copy even in the same mode: the caller closes the file's image


def read_image(
    path: str | os.PathLike, mode: str = "RGB", max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1
) -> Image.Image:
    """Decode an image file fully into 8-bit ``mode`` ("RGB" or "L"; see :func:`to_8bit`).

    Raises :class:`UnreadableImageError` naming the file and the reason: missing, not an image, truncated,
    unsupported mode, more than ``max_pixels`` pixels in its header (checked before decoding, so a
    decompression bomb costs nothing), or a shorter side below ``min_size`` pixels (training readers pass
    ``--min_image_size``, default :data:`DEFAULT_MIN_IMAGE_SIZE`).
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError(path, "file not found")
    # PIL runs its own check inside Image.open (a warning above MAX_IMAGE_PIXELS, an error above twice that).
    # Ours replaces it: raise PIL's limit to ours (process-wide) so that it never fires before ours does.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as err:  # PIL's own check: more than twice our limit
        raise UnreadableImageError(path, f"too many pixels ({err}); {_RAISE_LIMIT} {max_pixels:,})") from err
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise UnreadableImageError(path, f"cannot decode image, not an image file ({err})") from err
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise UnreadableImageError(path, _too_large(width, height, max_pixels))
        if min(width, height) < min_size:
            raise UnreadableImageError(
                path,
                f"too small: {width}x{height}, shorter side below --min_image_size {min_size} px (upscaled to "
                "the training resolution it would be a nearly flat image); lower --min_image_size to accept it",
            )
        try:
            img.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise UnreadableImageError(path, f"cannot decode image, truncated or corrupt ({err})") from err
        try:
            return to_8bit(img, mode, img.format)
        except ValueError as err:
            raise UnreadableImageError(path, str(err)) from err


_RAISE_LIMIT = "possible decompression bomb; if the image is genuine, raise --max_image_pixels (now"


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return (
        f"too many pixels: header says {width}x{height} = {width * height:,} ({_RAISE_LIMIT} {max_pixels:,})"
    )


def load_rgb(
    path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = 1
) -> Image.Image | None:
    """:func:`read_image` as RGB, or ``None`` when the file is unusable (use ``read_image`` for the reason)."""
    try:
        return read_image(path, "RGB", max_pixels, min_size)
    except UnreadableImageError:
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
