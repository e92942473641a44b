"""Intra-cluster LPIPS (IC-LPIPS; Ojha et al. 2021, as used by AnomalyDiffusion/DualAnoDiff), feature-cached.

Protocol:

1. Cluster centres: real images (the official script: the first ``N//3`` sorted test images of the defect
   type; chosen by the caller, see eval/compute_ic_lpips.py).
2. Every generated image is assigned to the centre with the smallest LPIPS distance; on a tie the last
   (highest-index) of the equally distant centres wins, as in the official script (``if dist <= min_dist``).
3. Per cluster, up to ``cluster_size`` (50) members are drawn at random with a seed (the official script
   shuffles with Python's unseeded ``random``: same distribution, not reproducible).
4. Per cluster, the mean LPIPS over all member pairs; IC-LPIPS = the mean over clusters with 2+ members.

The random draw is made online and is exactly uniform: the generated images are visited in one seeded
random permutation, and a cluster's members are the first ``cluster_size`` images of that order assigned
to it. So each image's VGG features are computed once, used for its centre assignment, and kept only if it
became a member. Kept features live in RAM up to ``cache_budget_gb`` (at 256 px one image's LPIPS-VGG
features take 32 MB); members beyond the budget are recomputed once, cluster by cluster (logged).

The official script instead calls ``lpips(x, y)`` per pair, re-running VGG on both images for every
centre comparison and every member pair; :func:`lpips_recompute_space` reproduces that cost for the
benchmark and for the equality test.

The algorithm is written against a small :class:`FeatureSpace` (embed / stack / distance) so that tests can
inject hand-checkable distances.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from utils.images import load_rgb
from utils.logging import get_logger, progress

logger = get_logger(__name__)

IC_LPIPS_RESOLUTION = 256
DEFAULT_CLUSTER_SIZE = 50


class FeatureSpace(Protocol):
    """What the IC-LPIPS algorithm needs from a distance."""

    def embed(self, items: Sequence[Any]) -> list[Any]:
        """One feature object per item."""

    def stack(self, feats: Sequence[Any]) -> Any:
        """Several feature objects -> one object ``distances`` can compare against."""

    def distances(self, a: Any, stacked: Any, start: int = 0) -> np.ndarray:
        """Distances from one feature object to ``stacked[start:]``."""

    def nbytes(self, feat: Any) -> int:
        """Memory held by one feature object (for the cache budget)."""


@dataclass
class ICLPIPSResult:
    value: float  # nan when no cluster has 2+ members
    num_images: int
    num_centres: int
    cluster_sizes: list[int]  # all assigned images per centre
    member_counts: list[int]  # members used (<= cluster_size)
    cluster_means: list[float | None]  # None for clusters with < 2 members
    recomputed: int = 0  # members whose features did not fit the cache budget
    assignment: list[int] = field(default_factory=list)  # centre index of every generated image

    def as_dict(self) -> dict[str, Any]:
        return {
            "ic_lpips": None if math.isnan(self.value) else self.value,
            "num_images": self.num_images,
            "num_centres": self.num_centres,
            "clusters_used": sum(m is not None for m in self.cluster_means),
            "cluster_sizes": self.cluster_sizes,
            "member_counts": self.member_counts,
            "cluster_means": self.cluster_means,
            "recomputed_members": self.recomputed,
        }


def nearest_centre(distances: np.ndarray) -> int:
    """Index of the smallest distance; the last one among equal minima (the official script's ``<=``)."""
    d = np.asarray(distances).ravel()
    return int(len(d) - 1 - np.argmin(d[::-1]))


def ic_lpips(
    generated: Sequence[Any],
    centres: Sequence[Any],
    space: FeatureSpace,
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    seed: int = 0,
    batch_size: int = 8,
    cache_budget_gb: float = 4.0,
    show_progress: bool = True,
) -> ICLPIPSResult:
    """IC-LPIPS of ``generated`` items around ``centres`` (items are whatever ``space.embed`` takes)."""
    if not centres:
        raise ValueError("IC-LPIPS needs at least one cluster centre (real training image)")
    if not generated:
        raise ValueError("IC-LPIPS needs at least one generated image")
    if cluster_size < 2:
        raise ValueError(f"cluster_size must be >= 2, got {cluster_size}")
    centre_stack = space.stack(space.embed(list(centres)))
    num_centres = len(centres)
    order = np.random.default_rng(seed).permutation(len(generated))
    assignment = [-1] * len(generated)
    members: list[list[int]] = [[] for _ in range(num_centres)]
    cache: dict[int, Any] = {}
    budget, used = int(cache_budget_gb * 2**30), 0

    bar = progress(total=len(generated), desc="IC-LPIPS assign", unit="img", disable=not show_progress)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size].tolist()
        feats = space.embed([generated[i] for i in idx])
        for i, f in zip(idx, feats):
            d = np.asarray(space.distances(f, centre_stack))
            c = nearest_centre(d)
            assignment[i] = c
            if len(members[c]) < cluster_size:
                members[c].append(i)
                size = space.nbytes(f)
                if used + size <= budget:
                    cache[i] = f
                    used += size
        bar.update(len(idx))
    bar.close()
    del centre_stack

    recomputed = sum(len(m) for m in members) - len(cache)
    if recomputed:
        logger.info(
            "IC-LPIPS: %d member features exceed --cache_budget_gb %.1f and are recomputed",
            recomputed,
            cache_budget_gb,
        )
    means: list[float | None] = []
    for mem in progress(members, desc="IC-LPIPS pairs", unit="cluster", disable=not show_progress):
        if len(mem) < 2:
            means.append(None)
            continue
        missing = [i for i in mem if i not in cache]
        for s in range(0, len(missing), batch_size):
            chunk = missing[s : s + batch_size]
            for i, f in zip(chunk, space.embed([generated[i] for i in chunk])):
                cache[i] = f
        feats = [cache[i] for i in mem]
        stacked = space.stack(feats)
        pairwise = getattr(space, "pairwise_upper", None)
        if pairwise is not None:  # all pairs at once (one matrix product per layer)
            pair_d = pairwise(stacked)
        else:
            pair_d = np.concatenate(
                [space.distances(feats[a], stacked, start=a + 1) for a in range(len(mem) - 1)]
            )
        means.append(float(np.asarray(pair_d, dtype=np.float64).mean()))
        del stacked
        for i in missing:  # recomputed features are not needed by other clusters
            cache.pop(i, None)
    valid = [m for m in means if m is not None]
    value = float(np.mean(valid)) if valid else float("nan")
    if not valid:
        logger.warning("IC-LPIPS undefined: no cluster received 2+ generated images")
    return ICLPIPSResult(
        value=value,
        num_images=len(generated),
        num_centres=num_centres,
        cluster_sizes=[assignment.count(c) for c in range(num_centres)],
        member_counts=[len(m) for m in members],
        cluster_means=means,
        recomputed=recomputed,
        assignment=assignment,
    )


# ---------------------------------------------------------------------------------------------- LPIPS spaces


def load_image_for_lpips(path: str | os.PathLike, resolution: int = IC_LPIPS_RESOLUTION) -> torch.Tensor:
    """[3,R,R] in [-1,1]: ``transforms.Resize((R, R))`` (PIL bilinear) as in the official script."""
    img = load_rgb(path)
    if img is None:
        raise ValueError(f"cannot read image {path} (corrupt or not an image)")
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _to_tensors(items: Sequence[Any], resolution: int) -> torch.Tensor:
    return torch.stack(
        [x if isinstance(x, torch.Tensor) else load_image_for_lpips(x, resolution) for x in items]
    )


class LPIPSFeatureSpace:
    """Items are image paths or [3,H,W] tensors in [-1,1]; features computed once per image."""

    def __init__(
        self,
        model: torch.nn.Module,
        device: str | torch.device = "cpu",
        resolution: int = IC_LPIPS_RESOLUTION,
        cache_device: str | torch.device = "cpu",
    ):
        self.model, self.device, self.resolution, self.cache_device = model, device, resolution, cache_device

    @torch.no_grad()
    def embed(self, items: Sequence[Any]) -> list[list[torch.Tensor]]:
        from losses.lpips_vgg import lpips_features

        x = _to_tensors(items, self.resolution).to(self.device)
        feats = [f.to(self.cache_device) for f in lpips_features(self.model, x)]
        # clone: a cached slice must not keep the whole batch tensor alive
        return [[f[i : i + 1].clone() for f in feats] for i in range(x.shape[0])]

    def stack(self, feats: Sequence[list[torch.Tensor]]) -> list[torch.Tensor]:
        return [torch.cat([f[k] for f in feats]).to(self.device) for k in range(len(feats[0]))]

    @torch.no_grad()
    def distances(self, a: list[torch.Tensor], stacked: list[torch.Tensor], start: int = 0) -> np.ndarray:
        from losses.lpips_vgg import lpips_distance_from_features

        a = [t.to(self.device) for t in a]
        return lpips_distance_from_features(self.model, a, [t[start:] for t in stacked]).cpu().numpy()

    @torch.no_grad()
    def pairwise_upper(self, stacked: list[torch.Tensor]) -> np.ndarray:
        """LPIPS of every pair i < j (row-major: (0,1), (0,2), ..., (1,2), ...), the order of ``distances``.

        LPIPS per layer is ``mean_p sum_c w_c (a_cp - b_cp)^2`` with the linear head's 1x1 weights ``w``, so
        with ``S_i = sum w a_i^2`` and ``G_ij = sum w a_i b_j`` it is ``(S_i + S_j - 2 G_ij) / HW``: one matrix
        product per layer instead of a feature difference per pair (same value up to fp32 rounding).
        """
        n = stacked[0].shape[0]
        total = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        for k, feat in enumerate(stacked):
            w = self.model.lins[k].model[-1].weight.reshape(1, -1, 1, 1).to(feat)
            flat = feat.flatten(1)
            wflat = (feat * w).flatten(1)
            sq = (wflat * flat).sum(1).double()
            gram = (wflat @ flat.T).double()
            total += (sq[:, None] + sq[None, :] - 2 * gram) / (feat.shape[2] * feat.shape[3])
        i, j = torch.triu_indices(n, n, offset=1)
        return total[i, j].float().cpu().numpy()

    def nbytes(self, feat: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in feat)


class LPIPSRecomputeSpace:
    """The official script's cost model: ``model(x, y)`` per pair, VGG re-run on both images every time."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", resolution: int = 256):
        self.model, self.device, self.resolution = model, device, resolution

    def embed(self, items: Sequence[Any]) -> list[torch.Tensor]:
        x = _to_tensors(items, self.resolution)
        return [x[i : i + 1] for i in range(x.shape[0])]

    def stack(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(feats)

    @torch.no_grad()
    def distances(self, a: torch.Tensor, stacked: list[torch.Tensor], start: int = 0) -> np.ndarray:
        a = a.to(self.device)
        return np.array([float(self.model(a, b.to(self.device))) for b in stacked[start:]], dtype=np.float32)

    def nbytes(self, feat: torch.Tensor) -> int:
        return feat.numel() * feat.element_size()


class CallableSpace:
    """Items are their own features; ``distance(a, b) -> float`` (hand-checkable tests)."""

    def __init__(self, distance: Callable[[Any, Any], float]):
        self.distance = distance
        self.calls = 0

    def embed(self, items: Sequence[Any]) -> list[Any]:
        return list(items)

    def stack(self, feats: Sequence[Any]) -> list[Any]:
        return list(feats)

    def distances(self, a: Any, stacked: list[Any], start: int = 0) -> np.ndarray:
        self.calls += len(stacked) - start
        return np.array([self.distance(a, b) for b in stacked[start:]], dtype=np.float64)

    def nbytes(self, feat: Any) -> int:
        return 0


def list_generated_images(image_dir: str | os.PathLike) -> list[Path]:
    """Generated images of one folder; a stage-2 folder ``<defect>/`` means its ``image/`` subfolder."""
    from utils.images import list_images

    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"generated image folder not found: {image_dir}")
    images = list_images(image_dir)
    if not images and (image_dir / "image").is_dir():
        images = list_images(image_dir / "image")
    if not images:
        raise FileNotFoundError(f"no images in {image_dir} (nor in {image_dir / 'image'})")
    return images
