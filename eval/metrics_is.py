"""Inception Score (Salimans et al. 2016) from class probabilities, with torch-fidelity's protocol.

IS = exp(E_x KL(p(y|x) || p(y))) on ``splits`` consecutive chunks of the samples (chunk ``i`` is rows
``i*N//splits : (i+1)*N//splits``, p(y) the chunk's mean); the result is the mean and the (population) standard
deviation over chunks.

``shuffle=True`` (default) is torch-fidelity's ISC, what the DualAnoDiff evaluation reports: the rows are first
permuted with ``np.random.RandomState(rng_seed).permutation(N)``, ``rng_seed=2020``
(``torch_fidelity.metric_isc.isc_features_to_metric``; tested equal). ``shuffle=False`` is the original /
StyleGAN2-ADA protocol (chunks in the given order). ``0 * log 0`` is taken as 0 (``scipy.special.rel_entr``),
the limit; for strictly positive probabilities this is exactly the reference formula.

``eval/compute_is.py`` calls torch-fidelity itself on image folders; this function serves probabilities that
are already in memory.
"""

from __future__ import annotations

import numpy as np
from scipy.special import rel_entr

TORCH_FIDELITY_SEED = 2020


def inception_score(
    probs: np.ndarray, splits: int = 10, shuffle: bool = True, rng_seed: int = TORCH_FIDELITY_SEED
) -> tuple[float, float]:
    """(mean, std) of the Inception Score over ``splits`` chunks of ``probs`` ``[N, num_classes]``."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, num_classes], got shape {p.shape}")
    if splits < 1 or p.shape[0] < splits:
        raise ValueError(f"need at least `splits` ({splits}) samples, got {p.shape[0]}")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs rows must be probability distributions (non-negative, summing to 1)")
    n = p.shape[0]
    if shuffle:
        p = p[np.random.RandomState(rng_seed).permutation(n)]
    scores = []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)
        kl = rel_entr(part, np.broadcast_to(marginal, part.shape)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
