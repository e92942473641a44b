"""How close U-Net features are to DINO tokens: SVCCA and CKNNA scores and a joint t-SNE plot.

SVCCA (Raghu et al. 2017): reduce each side to its top ``k`` principal directions, run CCA, report the
mean canonical correlation. CKNNA (Huh et al. 2024, "The Platonic Representation Hypothesis"; the alignment
metric of REPA / U-REPA): CKA restricted to the pairs that are mutual k-nearest neighbours in both spaces. U-Net features of the baseline (no head) and of the aligned model are compared
the same way: raw ``mid`` features, bilinearly resized to the DINO grid, one row per token.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def features_to_tokens(feat: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B,C,H,W] -> [B, gh*gw, C] on the DINO grid."""
    if tuple(feat.shape[-2:]) != tuple(grid):
        feat = F.interpolate(feat.float(), size=grid, mode="bilinear", align_corners=False)
    return feat.flatten(2).transpose(1, 2).float()


def svcca_score(x: np.ndarray, y: np.ndarray, k: int = 16, seed: int = 0, max_rows: int = 4000) -> float:
    """Mean canonical correlation of the top-``k`` PCA subspaces of x [M,Cx] and y [M,Cy] (rows paired)."""
    from sklearn.cross_decomposition import CCA
    from sklearn.decomposition import PCA

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"svcca_score: row counts differ ({x.shape[0]} vs {y.shape[0]})")
    if x.shape[0] > max_rows:
        idx = np.random.default_rng(seed).choice(x.shape[0], max_rows, replace=False)
        x, y = x[idx], y[idx]
    k = int(min(k, x.shape[1], y.shape[1], x.shape[0] - 1))
    if k < 1:
        raise ValueError("svcca_score: not enough rows/columns")
    xr = PCA(n_components=k, random_state=seed).fit_transform(x)
    yr = PCA(n_components=k, random_state=seed).fit_transform(y)
    cx, cy = CCA(n_components=k, max_iter=2000).fit(xr, yr).transform(xr, yr)
    corrs = [abs(np.corrcoef(cx[:, i], cy[:, i])[0, 1]) for i in range(k)]
    return float(np.nanmean(corrs))


def cknna_score(x: np.ndarray, y: np.ndarray, topk: int = 10) -> float:
    """CKNNA of paired rows x [N,Cx], y [N,Cy] (Huh et al. 2024, its unbiased form; REPA evaluates topk=10).

    Rows are L2-normalised (as the reference prepares features) and compared with inner-product kernels
    K = x x^T, L = y y^T. For a pair of kernels (A, B): each row's ``topk`` nearest neighbours by kernel value,
    diagonal excluded; mask M_ij = 1 when j is among i's neighbours in both; score = HSIC_u(M*A, M*B) with
    Song et al.'s unbiased HSIC (their eq. 5). CKNNA = s(K, L) / (sqrt(s(K, K) s(L, L)) + 1e-6).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"cknna_score: row counts differ ({n} vs {y.shape[0]})")
    if not 2 <= topk <= n - 1 or n < 4:
        raise ValueError(f"cknna_score: need 2 <= topk <= N - 1 and N >= 4 (topk={topk}, N={n})")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    K, L = x @ x.T, y @ y.T

    def neighbours(k: np.ndarray) -> np.ndarray:
        hat = k.copy()
        np.fill_diagonal(hat, -np.inf)
        idx = np.argpartition(-hat, topk - 1, axis=1)[:, :topk]
        mask = np.zeros_like(k)
        np.put_along_axis(mask, idx, 1.0, axis=1)
        return mask

    def hsic_unbiased(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.copy(), b.copy()
        np.fill_diagonal(a, 0.0)
        np.fill_diagonal(b, 0.0)
        value = np.sum(a * b.T) + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2.0 * np.sum(a @ b) / (n - 2)
        return float(value / (n * (n - 3)))

    nn_k, nn_l = neighbours(K), neighbours(L)

    def similarity(a: np.ndarray, mask_a: np.ndarray, b: np.ndarray, mask_b: np.ndarray) -> float:
        mask = mask_a * mask_b
        return hsic_unbiased(mask * a, mask * b)

    kl = similarity(K, nn_k, L, nn_l)
    kk = similarity(K, nn_k, K, nn_k)
    ll = similarity(L, nn_l, L, nn_l)
    return float(kl / (np.sqrt(kk * ll) + 1e-6))


def tsne_plot(
    unet_tokens: np.ndarray,
    dino_tokens: np.ndarray,
    path: str | os.PathLike,
    title: str = "",
    max_points: int = 1500,
    seed: int = 0,
) -> Path:
    """Joint 2-D t-SNE of (PCA-50 reduced, per-side standardised) U-Net and DINO tokens, coloured by source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    from utils.checkpoint import atomic_write

    rng = np.random.default_rng(seed)

    def prep(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, np.float64)
        if a.shape[0] > max_points:
            a = a[rng.choice(a.shape[0], max_points, replace=False)]
        a = (a - a.mean(0)) / (a.std(0) + 1e-8)
        return PCA(n_components=min(50, a.shape[1], a.shape[0] - 1), random_state=seed).fit_transform(a)

    u, d = prep(unet_tokens), prep(dino_tokens)
    width = max(u.shape[1], d.shape[1])
    u, d = np.pad(u, ((0, 0), (0, width - u.shape[1]))), np.pad(d, ((0, 0), (0, width - d.shape[1])))
    both = np.concatenate([u, d])
    emb = TSNE(
        n_components=2, init="pca", random_state=seed, perplexity=min(30, (len(both) - 1) / 3)
    ).fit_transform(both)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(*emb[: len(u)].T, s=3, alpha=0.6, label="U-Net mid")
    ax.scatter(*emb[len(u) :].T, s=3, alpha=0.6, label="DINOv2")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)
