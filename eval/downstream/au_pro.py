"""AU-PRO: area under the per-region-overlap curve up to a false-positive-rate limit (MVTec AD evaluation).

Definition (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021, Sec. 4.2): the ground truth of
all test images is split into 8-connected components; ``FPR(t)`` = predicted-anomalous anomaly-free pixels /
all anomaly-free pixels (over the whole test set); ``PRO(t)`` = mean over all components ``C`` of the fraction
of ``C`` predicted anomalous (each region counts once, whatever its size). The curve is integrated with the
trapezoidal rule up to ``FPR = fpr_limit`` (the last segment interpolated linearly at the limit, as both
references' ``trapezoid(x_max=...)``) and divided by ``fpr_limit`` so that a perfect map scores 1.

Two published codes draw the curve differently where scores tie (``rule``); they differ noticeably on maps
with saturated scores (softmax outputs at exactly 1.0), see docs/anomaly_downstream.md:

* ``"dualanodiff"`` (default; DualAnoDiff's / AnomalyDiffusion's ``eval/unet_utils/au_pro_util.py``, from
  MVTec 3D-AD's evaluation code, which the papers' numbers were made with): thresholds are positions in the
  ascending sorted anomaly-free scores ``s_0 <= ... <= s_{N-1}``; at position ``i`` the point is
  ``FPR = 1 - (i + 1) / N`` (the anomaly-free pixels *after* position ``i``, a count by position, not by value)
  and ``PRO = mean_C |{p in C : s(p) > s_i}| / |C|`` (strictly greater). Through a block of tied anomaly-free
  scores the PRO stays flat and rises only after the block. The reference samples
  ``num_thresholds=100`` evenly spaced positions (``np.linspace(0, N-1, 100, dtype=int)``); ``None`` here
  takes every position (the same rule without the sampling). The curve ends with (1, 1) and starts at
  (0, PRO above the largest anomaly-free score).
* ``"mvtec"`` (MVTec AD's official ``mvtec_ad_evaluation/pro_curve_util.py``): every pixel with score
  ``>= t`` is predicted anomalous, one vertex per distinct score (tied pixels are merged into one point), so
  the curve crosses a block of ties in a straight diagonal line; it runs from (0, 0) to (1, 1).

Speed (``"mvtec"``; the official code sorts every pixel of the test set): only thresholds with
``FPR <= fpr_limit`` matter, so only the anomaly-free scores are sorted (a plain value sort, no argsort of all
pixels), the anomalous pixels are kept down to the ``ceil(fpr_limit * N_ok)``-th largest anomaly-free score,
and only the curve's vertices at anomalous-pixel scores are built (between two of them the curve is a
horizontal run, whose area does not depend on the points inside it). ``"dualanodiff"`` with every position
keeps only the positions where the PRO changes (and their neighbours): the points left out lie on horizontal
runs. ``tests/anomaly/test_downstream_au_pro.py`` compares both rules with their references' formulas written
out directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

AU_PRO_RULES = ("dualanodiff", "mvtec")

# 8-connectivity inside a map, never across maps (the stack's first axis).
_STRUCTURE_2D_IN_3D = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_2D_IN_3D[1] = True


def _stack(arrays: np.ndarray | Sequence[np.ndarray], what: str) -> np.ndarray:
    out = np.asarray(arrays) if not isinstance(arrays, np.ndarray) else arrays
    if out.ndim == 2:
        out = out[None]
    if out.ndim != 3:
        raise ValueError(f"{what}: expected [N,H,W] maps (or one [H,W] map), got shape {out.shape}")
    return out


def trapezoid_to_limit(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under ``y(x)`` for ``x <= x_max``; ``x`` sorted ascending, ties allowed.

    When ``x_max`` is not a sample, the last piece ends at ``x_max`` with ``y`` interpolated linearly between
    its two neighbours (the samples just below and just above ``x_max``).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))
        if not 0 < ins < len(x):
            raise ValueError(f"x_max={x_max} lies outside the curve's x range [{x[0]}, {x[-1]}]")
        x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        correction = 0.5 * (y_at + y0) * (x_max - x0)
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction)


def _regions(
    anomaly_maps: np.ndarray | Sequence[np.ndarray], gt_masks: np.ndarray | Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ascending anomaly-free scores, anomalous-pixel scores, their PRO weights): each region's pixels sum to
    ``1 / n_regions``, so summing the weights of the pixels above a threshold gives the PRO."""
    scores = _stack(anomaly_maps, "anomaly maps")
    gt = _stack(gt_masks, "ground-truth masks")
    if scores.shape != gt.shape:
        raise ValueError(f"anomaly maps {scores.shape} and ground-truth masks {gt.shape} differ in shape")
    if not np.isfinite(scores).all():
        raise ValueError("anomaly maps contain NaN or Inf")
    gt = gt.astype(bool, copy=False)
    with_regions = np.flatnonzero(gt.reshape(len(gt), -1).any(1))  # label only maps that have a region
    labels, n_regions = ndimage.label(gt[with_regions], structure=_STRUCTURE_2D_IN_3D)
    if n_regions == 0:
        raise ValueError(
            "AU-PRO is undefined: the ground-truth masks contain no anomalous pixel (no region to overlap)"
        )
    flat = scores.ravel()
    gt_flat = gt.ravel()
    ok_sorted = flat[~gt_flat]
    ok_sorted.sort()  # in place: a full value sort is faster than np.partition + a sort of the top part
    if ok_sorted.size == 0:
        raise ValueError("AU-PRO is undefined: every pixel is anomalous in the ground truth (no FPR)")
    # Anomalous pixels in C order (map, row, column) in both arrays, so labels and scores line up.
    region_label = labels[labels > 0]
    region_scores = flat[np.flatnonzero(gt_flat)]
    sizes = np.bincount(region_label, minlength=n_regions + 1).astype(np.float64)
    weights = 1.0 / (sizes[region_label] * n_regions)
    return ok_sorted, region_scores, weights


def _ascending_with_suffix(
    region_scores: np.ndarray, weights: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Kept region scores ascending and ``suffix[i]`` = sum of their weights from ``i`` on (the PRO of a
    threshold that keeps pixels ``i..`` of the ascending order)."""
    region_scores, weights = region_scores[keep], weights[keep]
    order = np.argsort(region_scores, kind="stable")
    region_scores, weights = region_scores[order], weights[order]
    return region_scores, np.concatenate([np.cumsum(weights[::-1])[::-1], [0.0]])


def _mvtec_curve(
    ok_sorted: np.ndarray, region_scores: np.ndarray, weights: np.ndarray, fpr_limit: float
) -> tuple[np.ndarray, np.ndarray]:
    n_ok = ok_sorted.size
    # The k-th largest anomaly-free score: from it on, FPR >= fpr_limit.
    k = min(n_ok, max(1, math.ceil(fpr_limit * n_ok)))  # one vertex too many is harmless
    t_cut = ok_sorted[n_ok - k]
    region_scores, suffix = _ascending_with_suffix(region_scores, weights, region_scores >= t_cut)
    thresholds = np.unique(np.append(region_scores, t_cut))[::-1]  # descending, ends at t_cut
    fpr_ge = (n_ok - np.searchsorted(ok_sorted, thresholds, side="left")) / n_ok
    fpr_gt = (n_ok - np.searchsorted(ok_sorted, thresholds, side="right")) / n_ok
    pro_ge = suffix[np.searchsorted(region_scores, thresholds, side="left")]
    pro_gt = suffix[np.searchsorted(region_scores, thresholds, side="right")]
    # At each threshold: first the run of anomaly-free pixels strictly above it, then its own ties.
    fprs = np.concatenate([[0.0], np.stack([fpr_gt, fpr_ge], 1).ravel(), [1.0]])
    pros = np.concatenate([[0.0], np.stack([pro_gt, pro_ge], 1).ravel(), [1.0]])
    return np.clip(fprs, 0.0, 1.0), np.clip(pros, 0.0, 1.0)


def _dualanodiff_curve(
    ok_sorted: np.ndarray,
    region_scores: np.ndarray,
    weights: np.ndarray,
    fpr_limit: float,
    num_thresholds: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    n_ok = ok_sorted.size
    if num_thresholds is not None:
        positions = np.linspace(0, n_ok - 1, num=num_thresholds, dtype=int)
    else:
        # position i has FPR (N - 1 - i) / N; the last one needed is the first at or past the limit
        i_cut = max(0, n_ok - 1 - math.ceil(fpr_limit * n_ok))
        # The PRO changes between positions i - 1 and i where a region score r satisfies s_{i-1} < r <= s_i,
        # i.e. at i = searchsorted(s, r, "left"): keep those positions, their left neighbours and both ends.
        change = np.searchsorted(
            ok_sorted, np.unique(region_scores[region_scores > ok_sorted[i_cut]]), "left"
        )
        positions = np.unique(np.concatenate([[i_cut, n_ok - 1], change, change - 1]))
        positions = positions[(positions >= i_cut) & (positions <= n_ok - 1)]
    thresholds = ok_sorted[positions]
    sorted_scores, suffix = _ascending_with_suffix(region_scores, weights, region_scores > thresholds.min())
    pros = suffix[np.searchsorted(sorted_scores, thresholds, side="right")]  # score > threshold
    fprs = 1.0 - (positions + 1) / n_ok
    # ascending FPR, then the reference's closing point (1, 1)
    return np.append(fprs[::-1], 1.0), np.append(pros[::-1], 1.0)


def pro_curve(
    anomaly_maps: np.ndarray | Sequence[np.ndarray],
    gt_masks: np.ndarray | Sequence[np.ndarray],
    fpr_limit: float = 1.0,
    rule: str = "dualanodiff",
    num_thresholds: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) points of the PRO curve under ``rule`` (module docstring), ascending FPR, ending at (1, 1).

    Points past the first one at or beyond ``fpr_limit`` are left out (they do not change the area up to the
    limit); with ``fpr_limit=1`` the whole curve is returned. ``num_thresholds`` (``"dualanodiff"`` only): the
    reference's evenly spaced positions (100 in DualAnoDiff); ``None``: every position.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if rule not in AU_PRO_RULES:
        raise ValueError(f"AU-PRO rule must be one of {AU_PRO_RULES}, got {rule!r}")
    if num_thresholds is not None and (rule != "dualanodiff" or num_thresholds < 2):
        raise ValueError(
            "num_thresholds applies to rule='dualanodiff' only and must be >= 2 (reference: 100)"
        )
    ok_sorted, region_scores, weights = _regions(anomaly_maps, gt_masks)
    if rule == "mvtec":
        return _mvtec_curve(ok_sorted, region_scores, weights, fpr_limit)
    return _dualanodiff_curve(ok_sorted, region_scores, weights, fpr_limit, num_thresholds)


def au_pro(
    anomaly_maps: np.ndarray | Sequence[np.ndarray],
    gt_masks: np.ndarray | Sequence[np.ndarray],
    fpr_limit: float = 0.3,
    rule: str = "dualanodiff",
    num_thresholds: int | None = None,
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (AU-PRO at 0.3 by default); ``rule`` and
    ``num_thresholds`` as in :func:`pro_curve`."""
    fprs, pros = pro_curve(anomaly_maps, gt_masks, fpr_limit, rule, num_thresholds)
    return trapezoid_to_limit(fprs, pros, fpr_limit) / fpr_limit
