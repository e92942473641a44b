"""AU-PRO on a full MVTec AD test set's worth of maps: 1,725 maps of 256 x 256 (113 M pixels).

    python script/bench/bench_au_pro.py [--num_maps 1725] [--size 256] [--anomalous_fraction 0.73] [--check]

Synthetic data: float32 anomaly maps (uniform noise, raised inside the defects) and ground truth with 1-3
random rectangles/discs on ``--anomalous_fraction`` of the maps (MVTec AD: 1,258 of 1,725 test images are
defective). Times ``eval.downstream.au_pro.au_pro`` twice (the first call also pays for first-touch memory).
``--check`` also runs the dense algorithm of the official evaluation code (argsort of every pixel, cumulative
sums, one curve vertex per distinct score) on the same maps and prints both values and times.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import time

import numpy as np
from scipy import ndimage

from eval.downstream.au_pro import au_pro, trapezoid_to_limit


def synthetic(n: int, size: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    maps = rng.random((n, size, size), dtype=np.float32)
    gt = np.zeros((n, size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in np.flatnonzero(rng.random(n) < fraction):
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.integers(size // 8, size - size // 8, 2)
            r = int(rng.integers(max(2, size // 64), max(3, size // 10)))
            if rng.random() < 0.5:
                gt[i, max(0, cy - r) : cy + r, max(0, cx - r) : cx + r] = True
            else:
                gt[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    maps[gt] += 0.4 * rng.random(int(gt.sum()), dtype=np.float32)
    return maps, gt


def dense_au_pro(maps: np.ndarray, gt: np.ndarray, limit: float = 0.3) -> float:
    """The official evaluation's algorithm: every pixel sorted by score, FPR/PRO by cumulative sums."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, n_regions = ndimage.label(gt, structure=structure)
    labels = labels.ravel()
    sizes = np.bincount(labels)
    fp_change = (labels == 0).astype(np.float64)
    pro_change = np.where(labels > 0, 1.0 / sizes[labels], 0.0)
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    scores = maps.ravel()[order]
    fprs = np.cumsum(fp_change[order]) / fp_change.sum()
    pros = np.cumsum(pro_change[order]) / n_regions
    last_of_score = np.append(np.diff(scores) != 0, True)
    fprs = np.concatenate([[0.0], fprs[last_of_score], [1.0]])
    pros = np.concatenate([[0.0], pros[last_of_score], [1.0]])
    return trapezoid_to_limit(fprs, pros, limit) / limit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_maps", type=int, default=1725, help="maps (a full MVTec AD test set: 1725)")
    p.add_argument("--size", type=int, default=256, help="map side")
    p.add_argument("--anomalous_fraction", type=float, default=0.73, help="maps with a defect")
    p.add_argument("--check", action="store_true", help="also run the dense (sort-every-pixel) algorithm")
    args = p.parse_args()
    t = time.perf_counter()
    maps, gt = synthetic(args.num_maps, args.size, args.anomalous_fraction)
    print(f"data: {args.num_maps} maps {args.size}x{args.size}, {gt.any((1, 2)).sum()} with defects, "
          f"{gt.mean():.4f} anomalous pixels ({time.perf_counter() - t:.1f} s to build)")  # fmt: skip
    for run in (1, 2):
        t = time.perf_counter()
        value = au_pro(maps, gt, rule="mvtec")
        print(f"au_pro run {run}: {value:.10f} in {time.perf_counter() - t:.2f} s")
    if args.check:
        t = time.perf_counter()
        ref = dense_au_pro(maps, gt)
        print(f"dense (official algorithm): {ref:.10f} in {time.perf_counter() - t:.2f} s; "
              f"difference {abs(ref - value):.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
