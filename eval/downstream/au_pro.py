"""AU-PRO: area under the per-region-overlap curve up to a false-positive-rate limit (MVTec AD evaluation).

Definition (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021, Sec. 4.2; the official
``mvtec_ad_evaluation`` code): the ground truth of all test images is split into 8-connected components.
For a threshold ``t`` every pixel with score ``>= t`` is predicted anomalous;

* ``FPR(t)`` = predicted-anomalous anomaly-free pixels / all anomaly-free pixels (over the whole test set);
* ``PRO(t)`` = mean over all components ``C`` of ``|{p in C : s(p) >= t}| / |C|`` (each region counts once,
  whatever its size).

The curve runs over every distinct score (descending), starts at (0, 0) and ends at (1, 1); it is integrated
with the trapezoidal rule up to ``FPR = fpr_limit`` (the last segment interpolated linearly at the limit, as
the official ``trapezoid(x_max=...)``), and divided by ``fpr_limit`` so that a perfect map scores 1.

Speed: the official code sorts every pixel of the test set. Only thresholds with ``FPR <= fpr_limit`` matter,
so here only the anomaly-free scores are sorted (a plain value sort, no argsort of all pixels), the
anomalous pixels are kept down to the ``ceil(fpr_limit * N_ok)``-th largest anomaly-free score, and only the
curve's vertices at anomalous-pixel scores are built (between two of them the curve is a horizontal run, whose
area does not depend on the points inside it). The result is the same
polyline as the dense curve; ``tests/anomaly/test_downstream_au_pro.py`` compares it with a direct per-threshold
implementation of the definition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

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


def pro_curve(
    anomaly_maps: np.ndarray | Sequence[np.ndarray],
    gt_masks: np.ndarray | Sequence[np.ndarray],
    fpr_limit: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) vertices of the PRO curve, ascending, from (0, 0) to at least ``FPR = fpr_limit``, then (1, 1).

    Vertices past the first one at or beyond ``fpr_limit`` are left out (they do not change the area up to
    the limit); with ``fpr_limit=1`` the whole curve is returned.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
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
    n_ok = ok_sorted.size
    if n_ok == 0:
        raise ValueError("AU-PRO is undefined: every pixel is anomalous in the ground truth (no FPR)")

    # The k-th largest anomaly-free score: from it on, FPR >= fpr_limit.
    k = min(n_ok, max(1, math.ceil(fpr_limit * n_ok)))  # one vertex too many is harmless
    t_cut = ok_sorted[n_ok - k]

    # Anomalous pixels in C order (map, row, column) in both arrays, so labels and scores line up.
    region_label = labels[labels > 0]
    region_scores = flat[np.flatnonzero(gt_flat)]
    sizes = np.bincount(region_label, minlength=n_regions + 1).astype(np.float64)
    weights = 1.0 / (sizes[region_label] * n_regions)  # each region's pixels sum to 1 / n_regions
    keep = region_scores >= t_cut
    region_scores, weights = region_scores[keep], weights[keep]
    order = np.argsort(region_scores, kind="stable")
    region_scores, weights = region_scores[order], weights[order]
    # suffix[i] = sum of weights[i:]: the PRO of a threshold that keeps pixels i.. of the ascending order
    suffix = np.concatenate([np.cumsum(weights[::-1])[::-1], [0.0]])

    thresholds = np.unique(np.append(region_scores, t_cut))[::-1]  # descending, ends at t_cut
    fpr_ge = (n_ok - np.searchsorted(ok_sorted, thresholds, side="left")) / n_ok
    fpr_gt = (n_ok - np.searchsorted(ok_sorted, thresholds, side="right")) / n_ok
    pro_ge = suffix[np.searchsorted(region_scores, thresholds, side="left")]
    pro_gt = suffix[np.searchsorted(region_scores, thresholds, side="right")]
    # At each threshold: first the run of anomaly-free pixels strictly above it, then its own ties.
    fprs = np.concatenate([[0.0], np.stack([fpr_gt, fpr_ge], 1).ravel(), [1.0]])
    pros = np.concatenate([[0.0], np.stack([pro_gt, pro_ge], 1).ravel(), [1.0]])
    return np.clip(fprs, 0.0, 1.0), np.clip(pros, 0.0, 1.0)


def au_pro(
    anomaly_maps: np.ndarray | Sequence[np.ndarray],
    gt_masks: np.ndarray | Sequence[np.ndarray],
    fpr_limit: float = 0.3,
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD's AU-PRO at 0.3 by default)."""
    fprs, pros = pro_curve(anomaly_maps, gt_masks, fpr_limit)
    return trapezoid_to_limit(fprs, pros, fpr_limit) / fpr_limit
