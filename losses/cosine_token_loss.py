"""Token-wise cosine loss, shared by U-REPA's token alignment and DinoVQ's DINO-feature loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_token_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over batch and tokens of ``1 - cos(x, y)``; x, y: [B, N, D], computed in fp32."""
    if x.shape != y.shape:
        raise ValueError(f"cosine_token_loss: predicted tokens {tuple(x.shape)} vs targets {tuple(y.shape)}")
    return (1.0 - F.cosine_similarity(x.float(), y.float(), dim=-1, eps=1e-8)).mean()
