"""Detection and localization metrics of the anomaly-generation papers (AnomalyDiffusion, DualAnoDiff).

* image score = max over the anomaly map after a ``k x k`` box filter (``avg_pool2d(k, stride 1, padding
  k//2)``, zero padding counted, k = 21), as in DRAEM and the references' ``test-localization.py``;
* AUROC and AP: ``sklearn.metrics.roc_auc_score`` / ``average_precision_score`` (image level on the image
  scores, pixel level on all pixels of all test images pooled);
* F1-max: the largest F1 over all thresholds (``precision_recall_curve``); ``grid_step > 0`` evaluates only
  the thresholds ``0, step, 2 step, ..., 1`` with ``score > t``, the references' pixel-level rule;
* AU-PRO: :mod:`eval.downstream.au_pro` (up to FPR 0.3, normalised; DualAnoDiff's tie rule by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from eval.downstream.au_pro import au_pro

IMAGE_SCORE_KERNEL = 21
AU_PRO_LIMIT = 0.3
METRIC_NAMES = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "au_pro",
)


def image_scores_from_maps(maps: torch.Tensor, kernel: int = IMAGE_SCORE_KERNEL) -> torch.Tensor:
    """``[N,H,W]`` anomaly maps -> ``[N]`` image scores: max of the ``kernel``-box-filtered map."""
    if maps.ndim != 3:
        raise ValueError(f"expected [N,H,W] anomaly maps, got shape {tuple(maps.shape)}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"the smoothing kernel must be odd and >= 1, got {kernel}")
    smoothed = F.avg_pool2d(maps[:, None].float(), kernel, stride=1, padding=kernel // 2)
    return smoothed.flatten(1).amax(1)


def _binary(labels: np.ndarray | Sequence, scores: np.ndarray | Sequence, what: str):
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{what}: {y.size} labels but {s.size} scores")
    if y.all() or not y.any():
        raise ValueError(
            f"{what} needs both normal and anomalous samples; got only "
            f"{'anomalous' if y.all() else 'normal'} ones ({y.size})"
        )
    if not np.isfinite(s).all():
        raise ValueError(f"{what}: scores contain NaN or Inf")
    return y, s


def auroc(labels, scores, what: str = "AUROC") -> float:
    from sklearn.metrics import roc_auc_score

    y, s = _binary(labels, scores, what)
    return float(roc_auc_score(y, s))


def average_precision(labels, scores, what: str = "AP") -> float:
    from sklearn.metrics import average_precision_score

    y, s = _binary(labels, scores, what)
    return float(average_precision_score(y, s))


def f1_max(labels, scores, grid_step: float = 0.0, what: str = "F1-max") -> float:
    """Largest F1 over thresholds: all of them (``grid_step=0``) or ``score > t`` on a ``[0, 1]`` grid."""
    y, s = _binary(labels, scores, what)
    if grid_step > 0:
        best = 0.0
        n_pos = y.sum()
        for t in np.arange(0.0, 1.0 + 1e-3, grid_step):
            pred = s > t
            tp = np.logical_and(pred, y).sum()
            if tp == 0:
                continue
            precision, recall = tp / pred.sum(), tp / n_pos
            best = max(best, 2 * precision * recall / (precision + recall))
        return float(best)
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def localization_metrics(
    maps: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray,
    kernel: int = IMAGE_SCORE_KERNEL,
    f1_grid_step: float = 0.0,
    fpr_limit: float = AU_PRO_LIMIT,
    au_pro_rule: str = "dualanodiff",
    au_pro_num_thresholds: int | None = None,
) -> dict[str, float]:
    """All :data:`METRIC_NAMES` for ``[N,H,W]`` anomaly maps in [0, 1] and ``[N,H,W]`` boolean ground truth.

    ``au_pro_rule`` / ``au_pro_num_thresholds``: AU-PRO's tie rule and threshold sampling
    (:func:`eval.downstream.au_pro.pro_curve`).

    An image is anomalous when its mask has any anomalous pixel.
    """
    maps = torch.as_tensor(maps).float()
    masks = torch.as_tensor(masks).bool()
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(
            f"anomaly maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must both be [N,H,W]"
        )
    image_labels = masks.flatten(1).any(1).numpy()
    image_scores = image_scores_from_maps(maps, kernel).numpy()
    pixel_labels, pixel_scores = masks.numpy().ravel(), maps.numpy().ravel()
    return {
        "image_auroc": auroc(image_labels, image_scores, "image AUROC"),
        "image_ap": average_precision(image_labels, image_scores, "image AP"),
        "image_f1_max": f1_max(image_labels, image_scores, what="image F1-max"),
        "pixel_auroc": auroc(pixel_labels, pixel_scores, "pixel AUROC"),
        "pixel_ap": average_precision(pixel_labels, pixel_scores, "pixel AP"),
        "pixel_f1_max": f1_max(pixel_labels, pixel_scores, f1_grid_step, "pixel F1-max"),
        "au_pro": au_pro(maps.numpy(), masks.numpy(), fpr_limit, au_pro_rule, au_pro_num_thresholds),
    }
