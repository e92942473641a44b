"""A small CNN classifier: the replicas' independent feature space (Frechet distance, class accuracy).

Trained once by `preprocessing/trained_assets.py` on the digit images and never used as a training signal,
so a metric in its feature space cannot be gamed by the losses under test (the role Inception plays for FID).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn


class DigitClassifier(nn.Module):
    """Conv net for [B, 3, H, W] images in [-1, 1]; `features` is the pooled penultimate vector."""

    def __init__(self, *, num_classes: int = 10, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        self.config = {"num_classes": num_classes, "width": width, "feature_dim": feature_dim}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2)
            )

        self.body = nn.Sequential(
            block(3, width), block(width, width), block(width, 2 * width), block(2 * width, 2 * width)
        )
        self.proj = nn.Sequential(nn.Flatten(), nn.LazyLinear(feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)
        self.proj(self.body(torch.zeros(1, 3, 64, 64)))  # materialise the lazy layer for 64 px inputs

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (64, 64):
            images = nn.functional.interpolate(images, size=(64, 64), mode="bilinear", antialias=True)
        return self.proj(self.body(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors")
        )
        (directory / "config.json").write_text(json.dumps(self.config, indent=1) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> DigitClassifier:
        from safetensors.torch import load_file

        from utils.weights import require_file

        directory = Path(directory)
        how = "build it with: python preprocessing/trained_assets.py"
        require_file(directory / "config.json", "digit classifier config", how)
        require_file(directory / "model.safetensors", "digit classifier weights", how)
        model = cls(**json.loads((directory / "config.json").read_text()))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval().requires_grad_(False)
