"""Anomaly masks from generated foreground (fg) images, without a segmentation network.

The fg branch is trained on the anomalous image inside the mask and a constant background outside it
(``--fg_background``: grey, the references' ``normalised image x mask``, or black), so a generated fg image
is a defect on a near-constant background. The mask is recovered as:

1. distance from the background = max over RGB of ``|pixel - background|``, in [0, 1] (max, not luminance:
   a saturated blue stain differs little in luminance); on a black background this is the brightness;
2. Gaussian smoothing with ``sigma`` pixels (suppresses the sampler's speckle on the background);
3. threshold: Otsu's threshold of the smoothed distance, clipped to ``[min_threshold, max_threshold]``
   (or a fixed ``threshold``). The clip keeps an almost empty fg (no defect drawn) from turning noise into a
   mask, and an fg with little background from being split inside the defect;
4. ``binary_fill_holes`` (defect interiors close to the background value, ringed by a rim that is not) and
   one binary closing with a 3x3 structuring element (reconnects thin cracks broken by the threshold);
5. connected components (8-connectivity) smaller than ``min_area_fraction`` of the image are removed.

Defaults were checked on the synthetic MVTec defects (``tests/anomaly/test_eval_mask_extraction.py``):
mean IoU against the true masks, for both backgrounds, is reported in docs/anomaly_generation_eval.md.
The reference (DualAnoDiff) segments its fg images with a U-2-Net instead, which is not available offline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from datasets.mvtec import FG_BACKGROUNDS


@dataclass(frozen=True)
class MaskParams:
    background: str = "grey"  # the fg background the model was trained with (FG_BACKGROUNDS)
    sigma: float = 0.5
    threshold: float | None = None  # None: Otsu, clipped to [min_threshold, max_threshold]
    min_threshold: float = 0.02
    max_threshold: float = 0.3
    fill_holes: bool = True
    closing: bool = True
    min_area_fraction: float = 0.0005

    def __post_init__(self) -> None:
        if self.background not in FG_BACKGROUNDS:
            raise ValueError(f"background must be one of {tuple(FG_BACKGROUNDS)}, got {self.background!r}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if not 0.0 <= self.min_threshold <= self.max_threshold <= 1.0:
            raise ValueError("need 0 <= min_threshold <= max_threshold <= 1")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.min_area_fraction < 1.0:
            raise ValueError(f"min_area_fraction must be in [0, 1), got {self.min_area_fraction}")


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximises the between-class variance)."""
    hist, edges = np.histogram(values.ravel(), bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _as_array(fg: Image.Image | np.ndarray) -> np.ndarray:
    arr = np.asarray(fg.convert("RGB") if isinstance(fg, Image.Image) else fg)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"fg image must be [H,W], [H,W,1] or [H,W,3], got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def background_value(background: str) -> float:
    """The fg background in [0, 1] pixel units (grey 0.5, black 0)."""
    return (FG_BACKGROUNDS[background] + 1.0) / 2.0


def extract_mask(fg: Image.Image | np.ndarray, params: MaskParams = MaskParams()) -> np.ndarray:
    """Boolean ``[H,W]`` defect mask of one fg image (uint8 RGB, or float in [0, 1])."""
    distance = np.abs(_as_array(fg) - background_value(params.background)).max(axis=2)
    smooth = ndimage.gaussian_filter(distance, params.sigma) if params.sigma > 0 else distance
    if params.threshold is not None:
        t = params.threshold
    else:
        t = float(np.clip(otsu_threshold(smooth), params.min_threshold, params.max_threshold))
    mask = smooth > t
    if params.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if params.closing:
        mask = ndimage.binary_closing(mask, structure=np.ones((3, 3), bool), border_value=0) | mask
    min_area = params.min_area_fraction * mask.size
    if min_area > 0 and mask.any():
        labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
        areas = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        keep = np.concatenate([[False], areas >= min_area])
        mask = keep[labels]
    return mask


def mask_to_image(mask: np.ndarray) -> Image.Image:
    """Boolean mask -> L-mode PNG-ready image with 0 / 255, like MVTec's ground truth."""
    return Image.fromarray(mask.astype(np.uint8) * 255, mode="L")


def mask_iou(pred: np.ndarray, true: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    if pred.shape != true.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {true.shape}")
    union = np.logical_or(pred, true).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, true).sum() / union)
