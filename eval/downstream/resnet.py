"""ResNet-34 anomaly-type classifier (torchvision) with ImageNet weights found offline, or random init.

Weights: ``--resnet_weights auto`` (default) uses torchvision's own cache file
``$TORCH_HOME/hub/checkpoints/resnet34-b627a593.pth`` (what ``resnet34(weights="IMAGENET1K_V1")`` downloads)
when present, else starts from random weights with a logged warning (and the result says so); a path loads
that file (an error if it is missing); ``none`` forces random init. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from utils.logging import get_logger
from utils.weights import MissingWeightsError

logger = get_logger(__name__)


def resnet34_cache_path() -> Path:
    from torchvision.models import ResNet34_Weights

    name = Path(urlparse(ResNet34_Weights.IMAGENET1K_V1.url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _how_to_get() -> str:
    from torchvision.models import ResNet34_Weights

    return (
        f'On a machine with network run `python -c "import torchvision; torchvision.models.resnet34('
        f"weights='IMAGENET1K_V1')\"` (or download {ResNet34_Weights.IMAGENET1K_V1.url}) and copy the file to "
        f"{resnet34_cache_path()} (set TORCH_HOME to move that cache), or pass it as --resnet_weights PATH."
    )


def build_resnet34(num_classes: int, weights: str | os.PathLike = "auto") -> tuple[nn.Module, str | None]:
    """ResNet-34 with a fresh ``num_classes``-way ``fc``; returns (model, the ImageNet file loaded or None)."""
    from torchvision.models import resnet34

    model = resnet34(weights=None)
    source: Path | None = None
    if str(weights) == "auto":
        cache = resnet34_cache_path()
        if cache.is_file():
            source = cache
        else:
            logger.warning(
                "ImageNet weights for ResNet-34 not found (%s): training from RANDOM initialisation; the "
                "accuracies are not comparable with the references'. %s",
                cache,
                _how_to_get(),
            )
    elif str(weights) != "none":
        source = Path(weights).expanduser()
        if not source.is_file():
            raise MissingWeightsError(f"--resnet_weights {source} does not exist. {_how_to_get()}")
    if source is not None:
        state = torch.load(source, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        logger.info("ResNet-34 ImageNet weights: %s", source)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model, (str(source) if source is not None else None)
