"""Procedural MVTec-AD look-alike: real directory layout, visible defects, pixel-exact masks.

Layout (as the real dataset):
    <root>/<class>/train/good/000.png ...
    <root>/<class>/test/good/000.png ...
    <root>/<class>/test/<defect>/000.png ...
    <root>/<class>/ground_truth/<defect>/000_mask.png   (L mode, 0 / 255)

Classes: "hazelnut" (an object: a brown textured nut on a dark background; defects "hole", "crack") and
"carpet" (a woven texture; defects "cut", "color"). Every defect image is its defect-free twin with new
values written only where the mask is 255 and every masked pixel differs from the twin, so
`mask == (defective != good).any(-1)` holds exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

MVTEC_CLASSES: dict[str, tuple[str, ...]] = {"hazelnut": ("hole", "crack"), "carpet": ("cut", "color")}


@dataclass(frozen=True)
class MVTecCounts:
    train_good: int = 8
    test_good: int = 3
    test_defect: int = 6


def _class_seed(name: str) -> int:
    # stable across processes (str hash() is salted per process)
    return sum((i + 1) * ord(c) for i, c in enumerate(name))


def _hazelnut(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Good image [H,W,3] uint8 and the object's support mask [H,W] bool."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    img[:] = (35, 33, 30)  # dark table, away from the defect colours below
    img += rng.normal(0, 3, (size, size, 1))
    cy, cx = 0.5 + rng.uniform(-0.06, 0.06, 2)
    ry, rx = rng.uniform(0.28, 0.34), rng.uniform(0.22, 0.28)
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    r = (u / rx) ** 2 + (v / ry) ** 2
    obj = r <= 1.0
    shade = 1.0 - 0.35 * r  # darker towards the rim, like a lit round object
    stripes = 12 * np.sin(40 * v + rng.uniform(0, 6.28))  # shell grain
    nut = np.stack([150 * shade + stripes, 95 * shade + stripes * 0.6, 50 * shade + stripes * 0.3], -1)
    img[obj] = nut[obj]
    return np.clip(img, 0, 255).astype(np.uint8), obj


def _carpet(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 6.28, 2)
    weave = np.sin(2 * np.pi * xx / 4 + phase[0]) * np.sin(2 * np.pi * yy / 4 + phase[1])
    base = np.array([120, 110, 95], np.float32)
    img = base + 25 * weave[..., None] + rng.normal(0, 6, (size, size, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def _blob_mask(rng: np.random.Generator, size: int, center: np.ndarray, radius: float) -> np.ndarray:
    """Irregular filled polygon around center (pixel units)."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
    radii = radius * rng.uniform(0.7, 1.2, 9)
    pts = [
        (float(center[0] + r * np.cos(a)), float(center[1] + r * np.sin(a))) for a, r in zip(angles, radii)
    ]
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(pts, fill=255)
    return np.asarray(canvas) > 0


def _polyline_mask(
    rng: np.random.Generator, size: int, start: np.ndarray, width: int, steps: int
) -> np.ndarray:
    pts = [start.astype(float)]
    direction = rng.uniform(0, 2 * np.pi)
    for _ in range(steps):
        direction += rng.uniform(-0.7, 0.7)  # jagged, like a crack
        pts.append(pts[-1] + size * 0.07 * np.array([np.cos(direction), np.sin(direction)]))
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).line([tuple(p) for p in pts], fill=255, width=width)
    return np.asarray(canvas) > 0


def _defect_mask(rng, size: int, cls: str, defect: str, support: np.ndarray | None) -> np.ndarray:
    for _ in range(100):  # resample until the defect is large enough to see
        if cls == "hazelnut":
            ys, xs = np.nonzero(support)
            k = rng.integers(len(ys))
            center = np.array([xs[k], ys[k]], np.float32)
            if defect == "hole":
                mask = _blob_mask(rng, size, center, radius=size * rng.uniform(0.06, 0.1))
            else:
                mask = _polyline_mask(rng, size, center, width=max(1, size // 32), steps=6)
            mask &= support  # the defect lives on the nut only
        else:
            center = rng.uniform(0.2, 0.8, 2) * size
            if defect == "cut":
                mask = _polyline_mask(rng, size, center, width=max(2, size // 24), steps=5)
            else:
                mask = _blob_mask(rng, size, center, radius=size * rng.uniform(0.08, 0.14))
        if mask.sum() >= max(6, size * size // 400):
            return mask
    raise RuntimeError(f"could not place a visible {cls}/{defect} defect at size {size}")


def _paint_defect(rng, good: np.ndarray, mask: np.ndarray, cls: str, defect: str) -> np.ndarray:
    out = good.copy()
    n = int(mask.sum())
    noise = rng.normal(0, 4, (n, 1))
    if defect in ("hole", "cut"):
        values = np.array([8, 6, 5]) + noise  # dark gap showing the background through
    elif defect == "crack":
        values = np.array([60, 35, 20]) + noise
    else:  # "color": stain of a foreign hue, keeps the weave visible
        values = 0.35 * good[mask] + 0.65 * np.array([40, 140, 200]) + noise
    out[mask] = np.clip(values, 0, 255).astype(np.uint8)
    # Exactness guarantee: a masked pixel that happens to equal the original gets its red channel moved.
    same = mask & (out == good).all(-1)
    out[same, 0] = (good[same, 0].astype(np.int16) + 128) % 256
    return out


def render_sample(cls: str, split: str, defect: str, index: int, size: int = 64, seed: int = 0):
    """Return (good, defective, mask) uint8 arrays for one file; defective/mask are None for 'good'."""
    if cls not in MVTEC_CLASSES:
        raise ValueError(f"unknown synthetic MVTec class {cls!r}; choose from {sorted(MVTEC_CLASSES)}")
    if defect != "good" and defect not in MVTEC_CLASSES[cls]:
        raise ValueError(f"unknown defect {defect!r} for {cls}; choose from {MVTEC_CLASSES[cls]}")
    key = [seed, _class_seed(cls), _class_seed(split), _class_seed(defect), index, size]
    rng = np.random.default_rng(key)
    if cls == "hazelnut":
        good, support = _hazelnut(rng, size)
    else:
        good, support = _carpet(rng, size), None
    if defect == "good":
        return good, None, None
    mask = _defect_mask(rng, size, cls, defect, support)
    return good, _paint_defect(rng, good, mask, cls, defect), mask


def write_synthetic_mvtec(
    root: Path, size: int = 64, counts: MVTecCounts = MVTecCounts(), seed: int = 0
) -> Path:
    """Write the dataset under root; returns root."""
    root = Path(root)
    for cls, defects in MVTEC_CLASSES.items():
        jobs = [("train", "good", counts.train_good), ("test", "good", counts.test_good)]
        jobs += [("test", d, counts.test_defect) for d in defects]
        for split, defect, n in jobs:
            img_dir = root / cls / split / defect
            img_dir.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                good, bad, mask = render_sample(cls, split, defect, i, size=size, seed=seed)
                Image.fromarray(good if bad is None else bad).save(img_dir / f"{i:03d}.png")
                if mask is not None:
                    gt_dir = root / cls / "ground_truth" / defect
                    gt_dir.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(gt_dir / f"{i:03d}_mask.png")
    return root
