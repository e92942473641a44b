"""AU-PRO (``rule="mvtec"``) against the definition of Bergmann et al. (IJCV 2021) on hand-made cases and random
maps. The tie rules against their references' formulas: test_downstream_au_pro_rules.py.

``direct_au_pro`` below implements the definition literally and independently of eval/downstream/au_pro.py:
its own 8-connected component search (breadth-first), one binary prediction per distinct score, the overlap
of every component averaged over components, and the area up to the FPR limit by clipping each straight
segment of the curve at the limit.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from eval.downstream.au_pro import au_pro as _au_pro
from eval.downstream.au_pro import pro_curve


def au_pro(maps, gts, limit: float = 0.3) -> float:
    return _au_pro(maps, gts, limit, rule="mvtec")


def _components(gt: np.ndarray) -> list[np.ndarray]:
    """8-connected components of every map of ``gt`` [N,H,W], as boolean masks of the whole stack."""
    seen = np.zeros_like(gt, dtype=bool)
    comps = []
    n, h, w = gt.shape
    for i in range(n):
        for y in range(h):
            for x in range(w):
                if gt[i, y, x] and not seen[i, y, x]:
                    comp = np.zeros_like(gt, dtype=bool)
                    queue = deque([(y, x)])
                    seen[i, y, x] = True
                    while queue:
                        cy, cx = queue.popleft()
                        comp[i, cy, cx] = True
                        for dy in (-1, 0, 1):
                            for dx in (-1, 0, 1):
                                ny, nx = cy + dy, cx + dx
                                if 0 <= ny < h and 0 <= nx < w and gt[i, ny, nx] and not seen[i, ny, nx]:
                                    seen[i, ny, nx] = True
                                    queue.append((ny, nx))
                    comps.append(comp)
    return comps


def _area_to(xs: list[float], ys: list[float], limit: float) -> float:
    """Area under the polyline through (xs, ys) for x in [0, limit], segment by segment."""
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 >= limit or x1 == x0:
            continue
        xe = min(x1, limit)
        ye = y0 + (y1 - y0) * (xe - x0) / (x1 - x0)
        area += 0.5 * (y0 + ye) * (xe - x0)
    return area


def direct_au_pro(maps, gts, limit: float = 0.3) -> float:
    maps = np.asarray(maps, dtype=np.float64)
    gts = np.asarray(gts, dtype=bool)
    if maps.ndim == 2:
        maps, gts = maps[None], gts[None]
    comps = _components(gts)
    ok = ~gts
    xs, ys = [0.0], [0.0]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        pred = maps >= t
        xs.append((pred & ok).sum() / ok.sum())
        ys.append(float(np.mean([(pred & c).sum() / c.sum() for c in comps])))
    xs.append(1.0)
    ys.append(1.0)
    return _area_to(xs, ys, limit) / limit


def _row(scores: list[float], anomalous: list[int]) -> tuple[np.ndarray, np.ndarray]:
    maps = np.array([scores], dtype=np.float32)
    gt = np.zeros_like(maps, dtype=bool)
    gt[0, anomalous] = True
    return maps, gt


def test_single_component_hand_value():
    # component of 2 pixels (0.95, 0.5); 10 normal pixels 0.9, 0.8, ..., 0.0: up to FPR 0.3 the curve sits at
    # PRO 0.5 (only 0.95 is found before three normal pixels are), so AU-PRO = 0.5 * 0.3 / 0.3 = 0.5
    maps, gt = _row([0.95, 0.5, 0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0], [0, 1])
    assert au_pro(maps, gt) == pytest.approx(0.5, abs=1e-12)
    assert direct_au_pro(maps, gt) == pytest.approx(0.5, abs=1e-12)


def test_tie_between_region_and_normal_pixel_is_a_diagonal():
    # the second region pixel ties with the third normal pixel (0.7): from (0.2, 0.5) the curve goes straight
    # to (0.3, 1.0); area = 0.2 * 0.5 + 0.1 * (0.5 + 1.0) / 2 = 0.175 -> 0.175 / 0.3
    maps, gt = _row([0.95, 0.7, 0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0], [0, 1])
    assert au_pro(maps, gt) == pytest.approx(0.175 / 0.3, abs=1e-12)
    assert direct_au_pro(maps, gt) == pytest.approx(0.175 / 0.3, abs=1e-12)


def test_limit_inside_a_tie_segment_is_interpolated():
    # 4 normal pixels (0.9, 0.6, 0.3, 0.1), one region pixel tied at 0.6: the curve goes (0.25, 0) -> (0.5, 1);
    # at FPR 0.3 it is at 0.2: area = 0.5 * (0 + 0.2) * 0.05 = 0.005 -> 0.005 / 0.3
    maps, gt = _row([0.6, 0.9, 0.6, 0.3, 0.1], [0])
    assert au_pro(maps, gt) == pytest.approx(0.005 / 0.3, abs=1e-12)
    assert direct_au_pro(maps, gt) == pytest.approx(0.005 / 0.3, abs=1e-12)


def test_several_components_average_regions_not_pixels():
    # map 1: region A (1 px, 0.9); map 2: region B (3 px: 0.9, 0.1, 0.1). Ten normal pixels in (0.1, 0.9).
    # Up to FPR 0.3, A is found and 1/3 of B: PRO = (1 + 1/3) / 2 = 2/3 (pixel-weighted it would be 2/4).
    maps = np.full((2, 2, 4), 0.5, dtype=np.float32)
    gt = np.zeros_like(maps, dtype=bool)
    maps[0, 0, 0], gt[0, 0, 0] = 0.9, True
    maps[1, 0, :3], gt[1, 0, :3] = [0.9, 0.1, 0.1], True
    normal = [0.8, 0.7, 0.6, 0.5, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15]
    free = np.argwhere(~gt)
    for (i, y, x), s in zip(free, normal):
        maps[i, y, x] = s
    maps[tuple(free[len(normal) :].T)] = (
        0.12  # the remaining normal pixels: below every threshold that matters
    )
    assert au_pro(maps, gt) == pytest.approx(2 / 3, abs=1e-12)
    assert direct_au_pro(maps, gt) == pytest.approx(2 / 3, abs=1e-12)
    # diagonal neighbours belong to one region (8-connectivity): B's pixels as a diagonal chain, same answer
    gt2, maps2 = gt.copy(), maps.copy()
    gt2[1, 0, :3] = False
    gt2[1, 0, 0] = gt2[1, 1, 1] = gt2[1, 0, 2] = True
    maps2[1, 0, :3] = [0.9, 0.12, 0.1]
    maps2[1, 1, 1] = 0.1
    assert au_pro(maps2, gt2) == pytest.approx(direct_au_pro(maps2, gt2), abs=1e-12)
    assert len(_components(gt2)) == 2


def test_empty_masks_add_false_positives_only():
    maps, gt = _row([0.95, 0.5, 0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0], [0, 1])
    normal_map = np.full((1, 12), 0.0, dtype=np.float32)
    normal_map[0, :2] = 0.99  # two confident false positives in an image without defect
    both_maps = np.concatenate([maps, normal_map])
    both_gt = np.concatenate([gt, np.zeros_like(gt)])
    # 22 normal pixels. (2/22, 0) at 0.99, PRO 0.5 from 0.95 to FPR 6/22, PRO 1 from 0.5 on:
    # area = 0.5 * 4/22 + (0.3 - 6/22) = 0.3 - 4/22
    expected = (0.3 - 4 / 22) / 0.3
    assert au_pro(both_maps, both_gt) == pytest.approx(expected, abs=1e-12)
    assert direct_au_pro(both_maps, both_gt) == pytest.approx(expected, abs=1e-12)


def test_no_ground_truth_region_or_no_normal_pixel_is_an_error():
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(ValueError, match="no anomalous pixel"):
        au_pro(maps, np.zeros((2, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="every pixel is anomalous"):
        au_pro(maps, np.ones((2, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="differ in shape"):
        au_pro(maps, np.ones((2, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match="NaN"):
        au_pro(np.full((1, 2, 2), np.nan), np.eye(2, dtype=bool)[None])


def test_perfect_and_inverted_maps():
    rng = np.random.default_rng(1)
    gt = rng.random((3, 8, 8)) < 0.2
    assert au_pro(gt.astype(np.float32) + 0.01 * rng.random(gt.shape), gt) == pytest.approx(1.0)
    assert au_pro(1.0 - gt.astype(np.float32), gt) == pytest.approx(0.0)


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_random_maps_match_the_definition(quantised, limit):
    rng = np.random.default_rng(7)
    for _ in range(12):
        n, h, w = rng.integers(1, 4), rng.integers(3, 10), rng.integers(3, 10)
        maps = rng.random((n, h, w)).astype(np.float32)
        if quantised:  # many ties within and across regions and normal pixels
            maps = np.round(maps * 5) / 5
        gt = rng.random((n, h, w)) < 0.25
        if not gt.any() or gt.all():
            continue
        assert au_pro(maps, gt, limit) == pytest.approx(direct_au_pro(maps, gt, limit), abs=1e-9)


def test_curve_is_monotone_and_spans_the_limit():
    rng = np.random.default_rng(3)
    maps = rng.random((4, 16, 16))
    gt = rng.random((4, 16, 16)) < 0.1
    fprs, pros = pro_curve(maps, gt, 0.3, rule="mvtec")
    assert fprs[0] == 0 and pros[0] == 0 and fprs[-1] == 1 and pros[-1] == 1
    assert np.all(np.diff(fprs) >= 0) and np.all(np.diff(pros) >= -1e-12)
    assert fprs[-2] >= 0.3  # the last built vertex is at or past the limit
