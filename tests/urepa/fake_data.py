"""Synthetic stand-in for SD15AlignedDataset (same item format), used through ``data.factory``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FakeAlignedDataset(torch.utils.data.Dataset):
    """Deterministic random items: latent [4,s,s], L2-normalised DINO tokens, prompt embeddings, class id."""

    def __init__(
        self,
        layers=("mid",),
        n: int = 8,
        D: int = 64,
        grid=(2, 2),
        dim: int = 32,
        latent_size: int = 8,
        num_classes: int = 4,
        nan_indices=(),
        seed: int = 0,
    ):
        g = torch.Generator().manual_seed(seed)
        self.layers = tuple(layers)
        self.latents = torch.randn(n, 4, latent_size, latent_size, generator=g)
        for i in nan_indices:
            self.latents[i, 0, 0, 0] = float("nan")
        self.tokens = F.normalize(torch.randn(n, grid[0] * grid[1], D, generator=g), dim=-1)
        self.clip_embeddings = torch.randn(num_classes + 1, 77, dim, generator=g)
        self.class_ids = torch.arange(n) % num_classes
        self.metadata = {"D": D, "grid": list(grid), "encoder": "fake", "count": n}

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        c = int(self.class_ids[i])
        return dict(
            latent=self.latents[i],
            dino_tokens={layer: self.tokens[i] for layer in self.layers},
            encoder_hidden_states=self.clip_embeddings[c],
            class_id=c,
        )


def make_dataset(layers=("mid",), **kwargs) -> FakeAlignedDataset:
    return FakeAlignedDataset(layers=layers, **kwargs)
