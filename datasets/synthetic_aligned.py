"""Synthetic stand-in for SD15AlignedDataset (same item format, no caches needed): smoke runs and tests.

Registered as the U-REPA dataset factory ``synthetic_aligned`` (train/urepa/data.py), e.g.::

    python train_sd15.py --config configs/sd15_repa_tiny.yaml --set data.factory=synthetic_aligned \
        "data.factory_kwargs={n: 8, D: 64, grid: [2, 2], dim: 768, latent_size: 8}"
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class SyntheticAlignedDataset(torch.utils.data.Dataset):
    """Deterministic random items: latent [4,s,s], L2-normalised DINO tokens, prompt embeddings, class id.

    Values are fp16-representable, so that LMDB caches of this data (tests/urepa/fake_data.py) hold it exactly.
    ``nan_indices`` puts a NaN into those items' latents (to test the non-finite-step handling).
    """

    def __init__(
        self,
        layers: Sequence[str] = ("mid",),
        n: int = 8,
        D: int = 64,
        grid: Sequence[int] = (2, 2),
        dim: int = 32,
        latent_size: int = 8,
        num_classes: int = 4,
        nan_indices: Sequence[int] = (),
        seed: int = 0,
    ):
        g = torch.Generator().manual_seed(seed)
        self.layers = tuple(layers)
        self.grid = tuple(grid)
        self.latents = torch.randn(n, 4, latent_size, latent_size, generator=g).half().float()
        for i in nan_indices:
            self.latents[i, 0, 0, 0] = float("nan")
        self.tokens = F.normalize(torch.randn(n, grid[0] * grid[1], D, generator=g), dim=-1).half().float()
        self.clip_embeddings = torch.randn(num_classes + 1, 77, dim, generator=g).half().float()
        self.class_ids = torch.arange(n) % num_classes
        self.metadata = {"D": D, "grid": list(grid), "encoder": "synthetic", "count": n}

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


def make_synthetic_aligned_dataset(layers: Sequence[str] = ("mid",), **kwargs) -> SyntheticAlignedDataset:
    """The ``synthetic_aligned`` dataset factory (keyword arguments: ``data.factory_kwargs``)."""
    return SyntheticAlignedDataset(layers=layers, **kwargs)
