"""AU-PRO's two tie rules, each against its reference's formula written out here on tied maps.

* ``rule="dualanodiff"``: DualAnoDiff ``eval/unet_utils/au_pro_util.py`` (``calculate_au_pro``, from MVTec
  3D-AD's evaluation code). With the anomaly-free scores sorted ascending ``s_0 <= ... <= s_{N-1}`` and the
  positions ``P = linspace(0, N - 1, K, dtype=int)`` (K = 100 in the reference):

      curve = [(1, 1)] + [(1 - (i + 1) / N,  mean_C |{p in C : s(p) > s_i}| / |C|)  for i in P], reversed
      AU-PRO = trapezoid(curve, x_max=0.3) / 0.3

  (FPR counted by position in the sorted list, PRO with a strict ``>``; each component ``C`` is an
  8-connected region of one ground-truth map.)
* ``rule="mvtec"``: MVTec AD ``mvtec_ad_evaluation/pro_curve_util.py`` (``compute_pro``): sort every pixel by
  score, descending; running sums of ``1`` per anomaly-free pixel (/ N) and ``1 / |C|`` per pixel of region ``C``
  (/ number of regions); of each run of equal scores keep only the last point; prepend (0, 0), append (1, 1).

``trapezoid(x, y, x_max)`` of both: the trapezoidal sum over ``x <= x_max`` plus, when ``x_max`` is not a
sample, the piece from the last sample below it to ``x_max`` with ``y`` interpolated linearly.
"""

from __future__ import annotations

from bisect import bisect

import numpy as np
import pytest
from scipy.ndimage import label

from eval.downstream.au_pro import au_pro, pro_curve


def _trapezoid(x, y, x_max: float) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    correction = 0.0
    if x_max not in x:
        ins = bisect(x, x_max)
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def _components_per_map(maps, gts):
    """(scores of each 8-connected component, all anomaly-free scores), map by map as the references do."""
    comps, ok = [], []
    for m, g in zip(maps, gts):
        lab, n = label(g, np.ones((3, 3), dtype=int))
        ok.append(m[lab == 0])
        comps += [m[lab == k + 1] for k in range(n)]
    return comps, np.concatenate(ok)


def dualanodiff_reference(maps, gts, limit: float = 0.3, num_thresholds: int | None = 100) -> float:
    comps, ok = _components_per_map(np.asarray(maps, np.float64), np.asarray(gts, bool))
    ok = np.sort(ok)
    n = len(ok)
    positions = np.linspace(0, n - 1, num=num_thresholds or n, dtype=int)
    fprs, pros = [1.0], [1.0]
    for pos in positions:
        t = ok[pos]
        fprs.append(1.0 - (pos + 1) / n)
        pros.append(float(np.mean([(c > t).mean() for c in comps])))
    return _trapezoid(fprs[::-1], pros[::-1], limit) / limit


def mvtec_reference(maps, gts, limit: float = 0.3) -> float:
    maps, gts = np.asarray(maps, np.float64), np.asarray(gts, bool)
    fp_change = np.zeros(maps.shape)
    pro_change = np.zeros(maps.shape)
    n_regions = 0
    for i, g in enumerate(gts):
        lab, n = label(g, np.ones((3, 3), dtype=int))
        n_regions += n
        fp_change[i][lab == 0] = 1
        for k in range(n):
            pro_change[i][lab == k + 1] = 1.0 / (lab == k + 1).sum()
    order = np.argsort(maps.ravel())[::-1]
    scores = maps.ravel()[order]
    fprs = np.cumsum(fp_change.ravel()[order]) / fp_change.sum()
    pros = np.cumsum(pro_change.ravel()[order]) / n_regions
    last_of_run = np.append(np.diff(scores) != 0, True)
    fprs = np.concatenate([[0.0], np.minimum(fprs[last_of_run], 1.0), [1.0]])
    pros = np.concatenate([[0.0], np.minimum(pros[last_of_run], 1.0), [1.0]])
    return _trapezoid(fprs, pros, limit) / limit


def _row(scores, anomalous):
    maps = np.array([[scores]], dtype=np.float32)  # one 1 x len map
    gt = np.zeros_like(maps, dtype=bool)
    gt[0, 0, anomalous] = True
    return maps, gt


def test_saturated_tie_hand_values():
    # one region of 2 pixels at 1.0; 10 normal pixels, 3 of them also at 1.0 (saturated softmax)
    maps, gt = _row([1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0], [0, 1])
    # mvtec: the tie block is one point (0.3, 1): a diagonal from (0, 0), area 0.15 -> 0.5
    assert au_pro(maps, gt, rule="mvtec") == pytest.approx(0.5, abs=1e-12)
    assert mvtec_reference(maps, gt) == pytest.approx(0.5, abs=1e-12)
    # dualanodiff: PRO(> 1.0) = 0 at FPR 0, 0.1, 0.2; PRO(> 0.5) = 1 at FPR 0.3: area 0.05 -> 1/6
    assert au_pro(maps, gt) == pytest.approx(1 / 6, abs=1e-12)
    assert dualanodiff_reference(maps, gt, num_thresholds=None) == pytest.approx(1 / 6, abs=1e-12)


def _tied_maps(rng, n=3, h=12, w=12):
    """Softmax-like maps quantised to a few levels, many pixels saturated at exactly 1.0 in and out of the
    regions (ties inside regions, between regions and normal pixels, and among normal pixels)."""
    gt = np.zeros((n, h, w), dtype=bool)
    for i in range(n - 1):  # the last map has no defect
        y, x = rng.integers(0, h - 4, 2)
        gt[i, y : y + rng.integers(2, 5), x : x + rng.integers(2, 5)] = True
    maps = np.clip(rng.normal(0.3, 0.3, gt.shape) + 0.6 * gt, 0, None)
    maps = np.minimum(np.round(maps * 8) / 8, 1.0).astype(np.float32)
    return maps, gt


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_both_rules_match_their_references_on_tied_maps(limit):
    rng = np.random.default_rng(11)
    differ = 0
    for _ in range(8):
        maps, gt = _tied_maps(rng)
        assert (maps == 1.0).sum() > 5
        mv = au_pro(maps, gt, limit, rule="mvtec")
        assert mv == pytest.approx(mvtec_reference(maps, gt, limit), abs=1e-9)
        dense = au_pro(maps, gt, limit, rule="dualanodiff")
        assert dense == pytest.approx(dualanodiff_reference(maps, gt, limit, num_thresholds=None), abs=1e-9)
        sampled = au_pro(maps, gt, limit, rule="dualanodiff", num_thresholds=100)
        assert sampled == pytest.approx(dualanodiff_reference(maps, gt, limit, num_thresholds=100), abs=1e-9)
        differ += abs(mv - dense) > 1e-3
    assert differ >= 4  # the rules really differ on such maps


def test_untied_maps_agree_up_to_one_anomaly_free_pixel():
    # without ties the two curves differ only inside each 1/N step of FPR (staircase vs its chords)
    rng = np.random.default_rng(5)
    maps = rng.random((2, 32, 32))
    gt = rng.random((2, 32, 32)) < 0.1
    n_ok = (~gt).sum()
    assert abs(au_pro(maps, gt, rule="mvtec") - au_pro(maps, gt)) <= 1.0 / (0.3 * n_ok)


def test_dense_curve_keeps_only_points_where_pro_changes_but_the_same_area():
    rng = np.random.default_rng(2)
    maps, gt = _tied_maps(rng, n=4, h=24, w=24)
    fprs, pros = pro_curve(maps, gt, 1.0)
    assert len(fprs) < (~gt).sum()  # thinned
    assert np.all(np.diff(fprs) > 0) and np.all(np.diff(pros) >= -1e-12)
    assert (fprs[0], fprs[-1], pros[-1]) == (0.0, 1.0, 1.0)
    full = dualanodiff_reference(maps, gt, 1.0, num_thresholds=None)
    assert np.trapezoid(pros, fprs) == pytest.approx(full, abs=1e-12)


def test_bad_rule_or_thresholds():
    maps, gt = _row([0.9, 0.1, 0.2], [0])
    with pytest.raises(ValueError, match="rule"):
        au_pro(maps, gt, rule="anomalib")
    with pytest.raises(ValueError, match="num_thresholds"):
        au_pro(maps, gt, rule="mvtec", num_thresholds=100)
