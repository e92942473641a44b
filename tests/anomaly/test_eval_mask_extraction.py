"""Mask extraction from fg images against the synthetic MVTec defects' true masks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from eval.mask_extraction import MaskParams, extract_mask, mask_iou, otsu_threshold

GREY = 128  # the decoded fg's background: 0 in [-1, 1] -> 127.5 -> 128 after to_pil's rounding


def _samples(root, background: str):
    """(defect, fg, true mask) of every synthetic defect image; fg as the references build it."""
    out = []
    for cls in ("hazelnut", "carpet"):
        for d in sorted((root / cls / "test").iterdir()):
            if d.name == "good":
                continue
            for p in sorted(d.glob("*.png")):
                img = np.asarray(Image.open(p).convert("RGB"))
                m = np.asarray(Image.open(root / cls / "ground_truth" / d.name / f"{p.stem}_mask.png")) > 127
                fill = GREY if background == "grey" else 0
                out.append((d.name, np.where(m[..., None], img, fill).astype(np.uint8), m))
    return out


def mean_ious(root, background: str, speckle: bool, seed: int = 0) -> dict[str, float]:
    """Mean IoU per defect; ``speckle`` adds uniform background noise of 12/255 (0..12 on black, +-12 on
    grey: black cannot go below 0)."""
    rng = np.random.default_rng(seed)
    params = MaskParams(background=background)
    ious: dict[str, list[float]] = {}
    for defect, fg, mask in _samples(root, background):
        if speckle:
            low = 0 if background == "black" else -12
            fg = np.clip(fg.astype(int) + rng.integers(low, 13, fg.shape), 0, 255).astype(np.uint8)
        ious.setdefault(defect, []).append(mask_iou(extract_mask(fg, params), mask))
    return {k: float(np.mean(v)) for k, v in ious.items()}


def test_iou_on_synthetic_defects_black_background(tiny_assets):
    clean = mean_ious(tiny_assets["mvtec"], "black", speckle=False)
    noisy = mean_ious(tiny_assets["mvtec"], "black", speckle=True)
    # bright defects are exact; near-black ones (RGB ~ (8,6,5)) only separate from a clean black background
    assert clean["crack"] > 0.95 and clean["color"] > 0.95
    assert clean["hole"] > 0.8 and clean["cut"] > 0.65
    assert noisy["crack"] > 0.95 and noisy["color"] > 0.95


def test_iou_on_synthetic_defects_grey_background(tiny_assets):
    """On the references' grey background every synthetic defect stands out, dark ones included."""
    clean = mean_ious(tiny_assets["mvtec"], "grey", speckle=False)
    noisy = mean_ious(tiny_assets["mvtec"], "grey", speckle=True)
    assert all(v > 0.95 for v in clean.values()), clean
    assert all(v > 0.9 for v in noisy.values()), noisy
    # the background setting matters: black-background extraction on a grey fg finds the whole image
    _, fg, mask = _samples(tiny_assets["mvtec"], "grey")[0]
    assert mask_iou(extract_mask(fg, MaskParams(background="black")), mask) < 0.5


def test_small_components_removed_and_holes_filled():
    fg = np.zeros((64, 64, 3), np.uint8)
    fg[10:30, 10:30] = 200
    fg[15:25, 15:25] = 0  # dark interior ringed by the defect rim
    fg[50, 50] = 255  # a speck
    mask = extract_mask(fg, MaskParams(sigma=0, background="black"))
    assert mask[20, 20] and not mask[50, 50]
    truth = np.zeros((64, 64), bool)
    truth[10:30, 10:30] = True
    assert mask_iou(mask, truth) > 0.95


def test_empty_fg_gives_empty_mask_and_otsu_splits_two_levels():
    assert not extract_mask(np.zeros((32, 32, 3), np.uint8), MaskParams(background="black")).any()
    assert not extract_mask(np.full((32, 32, 3), GREY, np.uint8)).any()
    v = np.concatenate([np.full(100, 0.1), np.full(100, 0.7)])
    assert 0.1 <= otsu_threshold(v) <= 0.7
    with pytest.raises(ValueError):
        MaskParams(min_threshold=0.5, max_threshold=0.1)
