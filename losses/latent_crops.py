"""Random crops that cut the same region out of a latent and out of the image it encodes.

A latent of side ``L`` from an image of side ``L * f`` (``f`` = the VAE's downsampling factor, 8 for SD): the
latent box ``[top, top + h) x [left, left + w)`` covers the image box ``[f top, f (top + h)) x [f left, ...)``.
Flips need no special case: the trainers encode the already flipped image, so its latent and the image the
crop is taken from are in the same (flipped) frame.

Crop positions are *tiles*: per axis the offsets ``0, c, 2c, ...`` (and ``L - c`` when ``c`` does not divide
``L``), drawn uniformly per sample. When ``c`` divides ``L`` every latent position is covered with the same
probability, so the expected gradient of a crop loss weights the whole image like the full-image loss does
(uniform offsets in ``0..L-c`` would cover the border ``c`` times less often than the centre), and the set of
crops per image is finite, so target features can still be cached per (image, flip, crop).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["tile_offsets", "crop_tiles", "sample_crop_boxes", "crop_boxes"]

Box = tuple[int, int, int, int]  # (top, left, height, width) in latent pixels


def tile_offsets(size: int, crop: int) -> list[int]:
    """Start offsets of crops of length ``crop`` that tile ``[0, size)``; ``[0]`` when ``crop >= size``."""
    if size <= 0 or crop <= 0:
        raise ValueError(f"tile_offsets: size and crop must be positive, got size={size}, crop={crop}")
    if crop >= size:
        return [0]
    offsets = list(range(0, size - crop + 1, crop))
    if offsets[-1] != size - crop:
        offsets.append(size - crop)
    return offsets


def crop_tiles(height: int, width: int, crop: int) -> list[Box]:
    """Every tile box of a ``height x width`` latent for a square crop side ``crop`` (clipped to the latent)."""
    ch, cw = min(crop, height), min(crop, width)
    return [(t, le, ch, cw) for t in tile_offsets(height, ch) for le in tile_offsets(width, cw)]


def sample_crop_boxes(
    batch: int, height: int, width: int, crop: int, generator: torch.Generator | None = None
) -> list[Box]:
    """One tile per sample, uniformly over :func:`crop_tiles` (drawn on the CPU from ``generator``)."""
    tiles = crop_tiles(height, width, crop)
    if len(tiles) == 1:
        return tiles * batch
    picks = torch.randint(len(tiles), (batch,), generator=generator).tolist()
    return [tiles[k] for k in picks]


def crop_boxes(x: torch.Tensor, boxes: Sequence[Box], scale: int = 1) -> torch.Tensor:
    """Stack ``x[i, :, scale*top : scale*(top+h), scale*left : scale*(left+w)]`` over the batch.

    ``scale`` = 1 for latents, the VAE factor for the images they encode. All boxes must have one size.
    """
    if x.ndim != 4 or x.shape[0] != len(boxes):
        raise ValueError(f"crop_boxes: {len(boxes)} boxes for a tensor of shape {tuple(x.shape)}")
    if len({(h, w) for _, _, h, w in boxes}) > 1:
        raise ValueError(f"crop_boxes: boxes of different sizes {sorted({(h, w) for _, _, h, w in boxes})}")
    out = []
    for i, (top, left, h, w) in enumerate(boxes):
        y0, x0 = top * scale, left * scale
        if y0 < 0 or x0 < 0 or y0 + h * scale > x.shape[-2] or x0 + w * scale > x.shape[-1]:
            raise ValueError(f"crop box {(top, left, h, w)} x{scale} outside a {tuple(x.shape[-2:])} tensor")
        out.append(x[i, :, y0 : y0 + h * scale, x0 : x0 + w * scale])
    return torch.stack(out)
