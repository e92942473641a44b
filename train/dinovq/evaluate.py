"""Reconstruction metrics for the DinoVQ tokenizer on a held-out set.

* PSNR (dB) on [0,1] images: ``10 log10(1 / MSE)`` per image, averaged.
* SSIM (Wang et al. 2004): 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03, data range 1, per channel,
  'valid' windows only (no padding), averaged over channels, positions and images - the same definition as
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1)`` up to its border crop.
* LPIPS-VGG (when its weights are available), codebook usage (distinct codes / codebook size) and perplexity
  (``exp(entropy)`` of the code histogram over the whole set), rFID (FID between the held-out images and their
  reconstructions) when the Inception weights are available: clean-fid's features of the images in [0, 255]
  (``models.inception.CleanFIDInception``: clean-fid's per-image resizer and feature extractor, as clean-fid's
  ``get_model_features`` treats generator outputs) and clean-fid's ``fid_from_feats``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from utils.logging import get_logger

logger = get_logger(__name__)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR of [B,C,H,W] images in [0,1]."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of [B,C,H,W] images in [0,1] (definition in the module docstring)."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim expects two [B,C,H,W] tensors of one shape, got {x.shape} and {y.shape}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim: images of {tuple(x.shape[-2:])} px are smaller than the {window}px window")
    c = x.shape[1]
    w = _gaussian_window(window, sigma).to(torch.float64)[None, None].repeat(c, 1, 1, 1)
    x, y = x.double(), y.double()

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def codebook_stats(indices: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage (fraction of codes used at least once) and perplexity of a set of code indices."""
    counts = torch.bincount(indices.flatten().long().cpu(), minlength=codebook_size).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum())
    return {
        "codebook_usage": float((counts > 0).sum()) / codebook_size,
        "codebook_perplexity": math.exp(entropy),
    }


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two feature sets (rows = samples): clean-fid's ``fid_from_feats`` (np.mean / np.cov, its
    ``frechet_distance``)."""
    from cleanfid.fid import fid_from_feats

    return float(fid_from_feats(np.asarray(feats_a), np.asarray(feats_b)))


@torch.no_grad()
def evaluate_reconstruction(
    model,
    batches: Iterable[dict],
    codebook_size: int,
    lpips_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    inception: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    max_images: int | None = None,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """Metrics over ``batches`` ({"image": [B,3,H,W] in [-1,1]}); returns (metrics, first batch of recon)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    n, all_idx, first = 0, [], None
    feats_real, feats_fake = [], []
    try:
        for batch in batches:
            imgs = batch["image"].to(device)
            if max_images is not None and n >= max_images:
                break
            rec, idx = model.reconstruct(imgs)
            rec = rec.float().clamp(-1, 1)
            if first is None:
                first = torch.cat([imgs.cpu(), rec.cpu()])
            x01, r01 = (imgs.float() + 1) / 2, (rec + 1) / 2
            sums["psnr"] += float(psnr(r01, x01).sum())
            sums["ssim"] += float(ssim(r01, x01).sum()) if min(imgs.shape[-2:]) >= 11 else float("nan")
            if lpips_fn is not None:
                sums["lpips"] += float(lpips_fn(rec, imgs.float()).sum())
            if inception is not None:
                feats_real.append(inception(x01).double().cpu().numpy())
                feats_fake.append(inception(r01).double().cpu().numpy())
            all_idx.append(idx.cpu())
            n += imgs.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluation set is empty")
    metrics = {"psnr": sums["psnr"] / n, "ssim": sums["ssim"] / n}
    if lpips_fn is not None:
        metrics["lpips"] = sums["lpips"] / n
    metrics.update(codebook_stats(torch.cat([i.flatten() for i in all_idx]), codebook_size))
    if inception is not None:
        if n < 2:
            logger.warning("rFID skipped: needs at least 2 evaluation images, got %d", n)
        else:
            metrics["rfid"] = frechet_distance(np.concatenate(feats_real), np.concatenate(feats_fake))
    return metrics, first
