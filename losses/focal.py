"""Focal loss (Lin et al. 2017) in the form DRAEM and the anomaly-generation references train with.

``FL = -alpha_y (1 - p_t)^gamma log(p_t)`` averaged over pixels, where ``p_t`` is computed from class
*probabilities* (the references pass ``softmax(logits)``) with their label smoothing: the one-hot target is
clamped to ``[s / (C - 1), 1 - s]`` and ``p_t = sum_c onehot_c p_c + s`` (``s = smooth = 1e-5``). ``alpha``
None weighs every class 1 (the references' setting). ``smooth=0, gamma=0`` is the cross-entropy of ``probs``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def focal_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: Sequence[float] | None = None,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """``probs`` ``[B,C,H,W]`` (softmax output), ``target`` ``[B,1,H,W]`` or ``[B,H,W]`` class indices -> scalar."""
    if not 0.0 <= smooth <= 1.0:
        raise ValueError(f"smooth must be in [0, 1], got {smooth}")
    num_classes = probs.shape[1]
    if target.ndim == probs.ndim:
        target = target.squeeze(1)
    if target.shape != probs.shape[:1] + probs.shape[2:]:
        raise ValueError(f"target {tuple(target.shape)} does not match probabilities {tuple(probs.shape)}")
    probs = probs.float()
    idx = target.long()
    onehot = torch.nn.functional.one_hot(idx, num_classes).movedim(-1, 1).to(probs.dtype)
    if smooth:
        onehot = onehot.clamp(smooth / (num_classes - 1), 1.0 - smooth)
    pt = (onehot * probs).sum(1) + smooth
    loss = -((1.0 - pt) ** gamma) * pt.log()
    if alpha is not None:
        if len(alpha) != num_classes:
            raise ValueError(f"alpha has {len(alpha)} entries for {num_classes} classes")
        a = torch.as_tensor(alpha, dtype=probs.dtype, device=probs.device)
        loss = (a / a.sum())[idx] * loss  # normalised like the reference's list/array alpha
    return loss.mean()
