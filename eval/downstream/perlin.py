"""DRAEM-style synthetic anomalies (Zavrtanik et al., ICCV 2021): Perlin-noise masks filled with texture.

For one normal image ``I`` (float, [0, 1]) and one texture image ``A`` (any image folder):

1. Perlin noise at a random lattice resolution ``(2^a, 2^b)``, ``a, b`` uniform in 0..5, rotated by an angle
   uniform in [-90, 90] degrees, thresholded at 0.5 -> mask ``M``;
2. ``A`` resized to ``I``'s size and passed through 3 distinct operations drawn from DRAEM's 10 (gamma
   contrast, brightness multiply/add, sharpness, hue/saturation, solarize, posterize, invert, autocontrast,
   equalize, rotate +-45 degrees);
3. ``beta`` uniform in [0, 0.8]: ``I' = I (1 - M) + (1 - beta) A M + beta I M``.

Every draw comes from one ``numpy.random.Generator``, so an item depends only on its seed. The operations
are torchvision's (``transforms.v2.functional``) stand-ins for DRAEM's imgaug ones (see the deviations table
in docs/anomaly_downstream.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

PERLIN_MAX_EXPONENT = 5  # lattice resolution 2^0 .. 2^5 per axis (DRAEM: randint(0, 6))
PERLIN_THRESHOLD = 0.5
BETA_MAX = 0.8
MASK_ROTATION = 90.0


def _fade(t: torch.Tensor) -> torch.Tensor:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise_from_angles(shape: tuple[int, int], angles: torch.Tensor) -> torch.Tensor:
    """2-D gradient (Perlin) noise ``[H, W]`` on a lattice of ``angles.shape - 1`` cells per axis.

    ``angles[i, j]`` is the direction of the gradient at lattice corner ``(i, j)``; pixel ``(y, x)`` sits at
    lattice coordinate ``(y * ry / H, x * rx / W)``. The value is ``sqrt(2)`` times the quintic-faded
    interpolation of the four corner dot products (so it is 0 on lattice corners, about [-1, 1] elsewhere).
    """
    h, w = shape
    ry, rx = angles.shape[0] - 1, angles.shape[1] - 1
    if ry < 1 or rx < 1 or h % ry or w % rx:
        raise ValueError(f"image size {shape} must be a multiple of the lattice resolution {(ry, rx)}")
    grads = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1).double()  # [ry+1, rx+1, 2]
    y = torch.arange(h, dtype=torch.float64) * ry / h
    x = torch.arange(w, dtype=torch.float64) * rx / w
    yi, xi = y.floor().long(), x.floor().long()
    fy, fx = y - yi, x - xi

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[yi + dy][:, xi + dx]  # [H, W, 2]
        return g[..., 0] * (fy - dy)[:, None] + g[..., 1] * (fx - dx)[None, :]

    ty, tx = _fade(fy)[:, None], _fade(fx)[None, :]
    top = torch.lerp(corner(0, 0), corner(1, 0), ty)  # interpolate along y first (DRAEM's order)
    bottom = torch.lerp(corner(0, 1), corner(1, 1), ty)
    return (math.sqrt(2) * torch.lerp(top, bottom, tx)).float()


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator) -> torch.Tensor:
    """DRAEM's anomaly mask ``[1, H, W]`` in {0, 1}: rotated Perlin noise > 0.5."""
    ry, rx = (2 ** int(rng.integers(0, PERLIN_MAX_EXPONENT + 1)) for _ in range(2))
    angles = torch.from_numpy(2 * math.pi * rng.random((ry + 1, rx + 1)))
    noise = perlin_noise_from_angles(shape, angles)[None]
    angle = float(rng.uniform(-MASK_ROTATION, MASK_ROTATION))
    noise = TF.rotate(noise, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)
    return (noise > PERLIN_THRESHOLD).float()


# DRAEM's 10 texture operations, on uint8 [3, H, W]; each draws its own parameters.
def _gamma_contrast(x, rng):
    gammas = torch.from_numpy(rng.uniform(0.5, 2.0, 3)).float()[:, None, None]  # per channel
    return ((x.float() / 255) ** gammas * 255).round().clamp(0, 255).to(torch.uint8)


def _brightness(x, rng):
    mul, add = rng.uniform(0.8, 1.2), rng.uniform(-30, 30)
    return (x.float() * mul + add).round().clamp(0, 255).to(torch.uint8)


def _sharpness(x, rng):
    return TF.adjust_sharpness(x, float(rng.uniform(0.0, 2.0)))


def _hue_saturation(x, rng):
    hue_add, sat_add = rng.uniform(-50, 50, 2)  # imgaug units: 0..255 for a full turn / full saturation
    x = TF.adjust_hue(x, float(hue_add / 255))
    return TF.adjust_saturation(x, float(max(0.0, 1.0 + sat_add / 128)))


def _solarize(x, rng):
    if rng.random() < 0.5:
        return TF.solarize(x, float(rng.uniform(32, 128)))
    return x


def _posterize(x, rng):
    return TF.posterize(x, int(rng.integers(1, 9)))


def _invert(x, rng):
    return TF.invert(x)


def _autocontrast(x, rng):
    return TF.autocontrast(x)


def _equalize(x, rng):
    return TF.equalize(x)


def _rotate(x, rng):
    return TF.rotate(x, float(rng.uniform(-45, 45)), interpolation=InterpolationMode.BILINEAR, fill=0)


TEXTURE_OPS = (
    _gamma_contrast,
    _brightness,
    _sharpness,
    _hue_saturation,
    _solarize,
    _posterize,
    _invert,
    _autocontrast,
    _equalize,
    _rotate,
)


def augment_texture(texture: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """3 distinct operations out of :data:`TEXTURE_OPS`, in a random order, on a uint8 ``[3, H, W]`` image."""
    for k in rng.choice(len(TEXTURE_OPS), 3, replace=False):
        texture = TEXTURE_OPS[int(k)](texture, rng)
    return texture


def paste_anomaly(
    image: torch.Tensor, texture: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` float ``[3, H, W]`` in [0, 1], ``texture`` uint8 ``[3, H, W]`` -> (anomalous image, mask ``[1, H, W]``)."""
    mask = perlin_mask(tuple(image.shape[-2:]), rng)
    tex = augment_texture(texture, rng).float() / 255
    beta = float(rng.uniform(0.0, BETA_MAX))
    out = image * (1 - mask) + (1 - beta) * tex * mask + beta * image * mask
    return out, mask
