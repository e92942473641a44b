"""Tiny DinoVQ construction shared by the tests."""

from __future__ import annotations

import torch

from models.dinovq import DinoVQModel

TINY = dict(
    img_size=(28, 28),
    encoder_embed_dim=32,
    codebook_size=16,
    disc_dim=8,
    disc_num_layers=2,
    patch_size=7,
    encoder_depth=1,
    decoder_depth=1,
    dino_decoder_depth=1,
    num_heads=2,
    dino_dim=16,
    codebook_dim=8,
)


def tiny_model(seed: int = 0, **overrides) -> DinoVQModel:
    torch.manual_seed(seed)
    return DinoVQModel(**{**TINY, **overrides})


def batch(seed: int = 0, b: int = 2, n_tokens: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 28, 28, generator=g) * 2 - 1, torch.randn(b, n_tokens, 16, generator=g)
