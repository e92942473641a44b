"""FID and sFID from Inception statistics, with cached reference statistics of an image folder.

- FID: Frechet distance between Gaussians fitted to pool3 features [N,2048] (clean-fid's
  ``frechet_distance``, scipy ``sqrtm``).
- sFID (Nash et al. 2021, as in the ADM evaluator): the same distance on the "spatial" features, the first
  7 channels of ``mixed_6/conv`` (17x17) flattened to [N,2023] (``eval.inception``).
Reference images are center-cropped to a square and resized to the generation resolution (bicubic), then
fed to the Inception, which resizes to 299 itself, the same path generated images take.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from utils.images import IMAGE_EXTENSIONS, load_rgb
from utils.logging import get_logger, progress

logger = get_logger("fid")
FEATURES = ("pool", "spatial")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) (clean-fid's implementation)."""
    from cleanfid.fid import frechet_distance as _fd

    return float(_fd(np.asarray(mu1, np.float64), np.asarray(sigma1, np.float64), mu2, sigma2))


class StatsAccumulator:
    """Streaming mean/covariance (float64 sums), so 50k x 2048 features never sit in memory at once."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: np.ndarray | None = None
        self.outer: np.ndarray | None = None

    def update(self, feats: torch.Tensor | np.ndarray) -> None:
        x = np.asarray(feats.detach().cpu() if torch.is_tensor(feats) else feats, dtype=np.float64)
        if self.sum is None:
            self.sum, self.outer = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 images for FID statistics, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)  # unbiased, as np.cov
        return mu, sigma


@torch.no_grad()
def inception_stats(
    batches: Iterable[torch.Tensor], inception: torch.nn.Module, device: str | torch.device = "cpu"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"pool": (mu, sigma), "spatial": (mu, sigma)} of uint8-range [B,3,H,W] batches."""
    acc = {k: StatsAccumulator() for k in FEATURES}
    for images in batches:
        out = inception(images.to(device), outputs=FEATURES)
        for k in FEATURES:
            acc[k].update(out[k].double())
    return {k: a.stats() for k, a in acc.items()}


def fid_from_stats(a: dict, b: dict) -> dict[str, float]:
    return {
        "fid": frechet_distance(*a["pool"], *b["pool"]),
        "sfid": frechet_distance(*a["spatial"], *b["spatial"]),
    }


def to_uint8_range(images: torch.Tensor) -> torch.Tensor:
    """[-1,1] float images -> [0,255] float, quantised like a saved PNG."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


def list_reference_images(ref_dir: str | os.PathLike) -> list[Path]:
    ref_dir = Path(ref_dir)
    if not ref_dir.is_dir():
        raise FileNotFoundError(
            f"--ref_dir {ref_dir} is not a directory (expected e.g. ILSVRC/Data/CLS-LOC/val with <synset>/*.JPEG)"
        )
    files = sorted(p for p in ref_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images found under {ref_dir}")
    return files


def _center_crop_resize(img, size: int) -> torch.Tensor:
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()


def reference_stats(
    ref_dir: str | os.PathLike,
    inception: torch.nn.Module,
    resolution: int,
    num_images: int | None = 10_000,
    cache_dir: str | os.PathLike = ".cache/fid_stats",
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    inception_id: str = "",
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Statistics of ``num_images`` (seeded subsample; None = all) reference images, cached as .npz."""
    files = list_reference_images(ref_dir)
    if num_images is not None and num_images < len(files):
        rng = np.random.default_rng(seed)
        files = [files[i] for i in sorted(rng.choice(len(files), size=num_images, replace=False))]
    key = hashlib.sha1(
        json.dumps([str(Path(ref_dir).resolve()), len(files), resolution, inception_id, seed]).encode()
    ).hexdigest()[:12]
    cache = Path(cache_dir) / f"ref_{Path(ref_dir).name}_{len(files)}_{resolution}px_{key}.npz"
    if cache.is_file():
        data = np.load(cache)
        logger.info(f"reference statistics from cache {cache}")
        return {k: (data[f"{k}_mu"], data[f"{k}_sigma"]) for k in FEATURES}

    skipped = []

    def batches():
        buf = []
        for path in progress(files, desc="reference images", unit="img"):
            img = load_rgb(path)
            if img is None:
                skipped.append(str(path))
                continue
            buf.append(_center_crop_resize(img, resolution))
            if len(buf) == batch_size:
                yield torch.stack(buf)
                buf = []
        if buf:
            yield torch.stack(buf)

    stats = inception_stats(batches(), inception, device)
    if skipped:
        logger.warning(f"skipped {len(skipped)} unreadable reference images, e.g. {skipped[:3]}")
    from utils.checkpoint import atomic_write

    with atomic_write(cache) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                **{f"{k}_{s}": v for k, (mu, sig) in stats.items() for s, v in (("mu", mu), ("sigma", sig))},
            )
    logger.info(f"reference statistics cached at {cache}")
    return stats


def plot_metric_vs_step(results: Sequence[dict], path: str | os.PathLike, metrics=("fid", "sfid")) -> Path:
    """Line plot of metrics against training step, one line per run (results: dicts with run, step, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils.checkpoint import atomic_write

    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    runs = sorted({r["run"] for r in results})
    for ax, metric in zip(axes[0], metrics):
        for run in runs:
            pts = sorted((r["step"], r[metric]) for r in results if r["run"] == run and metric in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=run)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric.upper())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)
