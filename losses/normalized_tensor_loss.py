"""Distance between two activation tensors after a scale-free normalisation.

Activations of different layers live on wildly different scales (a ReLU map after a conv, the QKV projection
of a ViT block, a GELU output); comparing them raw lets a few large layers dominate a multi-layer perceptual
loss. Each tensor is therefore standardised on its own statistics before the distance is taken:

* conv maps ``[B, C, H, W]``: per sample and per channel, over the spatial positions
  (``(x - mean_hw) / (std_hw + eps)``, like instance norm without affine);
* token sequences ``[B, N, D]``: per sample and per token, over the feature dimension
  (``(x - mean_d) / (std_d + eps)``, like LayerNorm without affine);
* vectors ``[B, D]``: per sample over ``D``;
* anything else ``[B, ...]``: per sample over all non-batch elements (a 1-D tensor is one sample).

``std`` is the population standard deviation (``unbiased=False``). Prediction and target are each normalised
with their own statistics. Distances:

* ``l1``: ``mean(|p̂ - t̂|)`` over all elements;
* ``l2``: ``mean((p̂ - t̂)^2)`` over all elements;
* ``cosine``: ``mean(1 - cos(p̂, t̂))`` where the cosine is taken over the feature axis (channels ``C`` of a
  conv map at every position, ``D`` of every token / vector, the flattened sample otherwise).

Computation is in float32 whatever the activation dtype (bf16 statistics are too coarse).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("l1", "l2", "cosine")


def normalize_activation(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise ``x`` as described in the module docstring (float32 result)."""
    x = x.float()
    if x.ndim == 4:
        dims: tuple[int, ...] = (2, 3)
    elif x.ndim in (2, 3):
        dims = (-1,)
    elif x.ndim == 1:
        dims = (0,)
    else:
        dims = tuple(range(1, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)


def _feature_dim(ndim: int) -> int:
    return 1 if ndim == 4 else -1


class NormalizedTensorLoss(nn.Module):
    """``loss(pred, target)`` -> scalar; see the module docstring for the normalisation and the kinds."""

    def __init__(self, kind: str = "l2", eps: float = 1e-6):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"NormalizedTensorLoss: kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.eps = eps

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, eps={self.eps}"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(
                f"NormalizedTensorLoss: shapes differ, pred {tuple(pred.shape)} vs target {tuple(target.shape)}"
            )
        p = normalize_activation(pred, self.eps)
        t = normalize_activation(target, self.eps)
        if self.kind == "l1":
            return (p - t).abs().mean()
        if self.kind == "l2":
            return (p - t).pow(2).mean()
        if p.ndim in (2, 3, 4):
            cos = F.cosine_similarity(p, t, dim=_feature_dim(p.ndim), eps=self.eps)
        else:
            rows = 1 if p.ndim <= 1 else p.shape[0]
            cos = F.cosine_similarity(p.reshape(rows, -1), t.reshape(rows, -1), dim=-1, eps=self.eps)
        return (1.0 - cos).mean()
