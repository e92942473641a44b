"""LPIPS-VGG (Zhang et al. 2018, ``lpips`` package, v0.1) loaded offline, plus a feature-cached distance.

``build_lpips_vgg`` returns a frozen ``lpips.LPIPS(net="vgg")``: the calibrated linear heads ship inside the
``lpips`` package; the VGG16 backbone comes from the torchvision cache
(``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``) or an explicit file. Nothing is downloaded.

``lpips_features`` + ``lpips_distance_from_features`` split ``LPIPS.forward`` in two so that an image's VGG
features are computed once and compared against many others (IC-LPIPS, DinoVQ's perceptual term on a cached
target). ``lpips_distance_from_features(m, lpips_features(m, a), lpips_features(m, b))`` performs exactly the
operations of ``m(a, b)``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from utils.weights import MissingWeightsError

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"
# lpips' VGG16 slices end after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision features indices).
_LPIPS_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


def torchvision_vgg16_cache_path() -> Path:
    """Where ``torchvision.models.vgg16(weights=VGG16_Weights.IMAGENET1K_V1)`` stores its download."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def _how_to_get_vgg() -> str:
    return (
        f'Download {VGG16_URL} on a machine with network (or run `python -c "import torchvision; '
        f"torchvision.models.vgg16(weights='IMAGENET1K_V1')\"` there) and copy it to "
        f"{torchvision_vgg16_cache_path()} (set TORCH_HOME to move that cache), or pass its path as "
        f"--vgg_ckpt_path."
    )


def resolve_vgg16_checkpoint(vgg_ckpt_path: str | os.PathLike | None = None) -> Path:
    """The VGG16 ImageNet checkpoint file: ``vgg_ckpt_path`` if given, else the torchvision cache."""
    cache = torchvision_vgg16_cache_path()
    if vgg_ckpt_path is not None:
        path = Path(vgg_ckpt_path).expanduser()
        if path.is_file():
            return path
        raise MissingWeightsError(
            f"VGG16 backbone for LPIPS not found: --vgg_ckpt_path {path} does not exist "
            f"(the torchvision cache {cache} {'exists' if cache.is_file() else 'does not exist either'}). "
            + _how_to_get_vgg()
        )
    if cache.is_file():
        return cache
    raise MissingWeightsError(
        f"VGG16 backbone for LPIPS not found: no --vgg_ckpt_path given and the torchvision cache file {cache} "
        f"does not exist. " + _how_to_get_vgg()
    )


def _vgg_features_state(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """torchvision ``vgg16`` state (``features.N.*``) -> lpips ``net.sliceK.N.*`` keys."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    out = {}
    for k, (lo, hi) in enumerate(_LPIPS_VGG_SLICES, start=1):
        for idx in range(lo, hi):
            for name in ("weight", "bias"):
                key = f"features.{idx}.{name}"
                if key in state:
                    out[f"net.slice{k}.{idx}.{name}"] = state[key]
    expected = 2 * 13  # 13 conv layers, weight + bias
    if len(out) != expected:
        raise ValueError(
            f"{source} is not a torchvision VGG16 checkpoint: expected 26 'features.N.weight/bias' conv "
            f"tensors, found {len(out)} (first keys: {list(state)[:5]})"
        )
    return out


def _lpips_lin_weights_path() -> Path:
    import lpips

    return Path(lpips.__file__).resolve().parent / "weights" / "v0.1" / "vgg.pth"


def build_lpips_vgg(
    vgg_ckpt_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    pretrained_backbone: bool = True,
) -> nn.Module:
    """Frozen ``lpips.LPIPS(net="vgg", version="0.1")`` in eval mode, built without network access.

    ``pretrained_backbone=False`` keeps a randomly initialised VGG16 (tests and timing benchmarks only);
    the linear heads are always the calibrated ones from the ``lpips`` package.
    """
    import lpips

    lin_path = _lpips_lin_weights_path()
    if not lin_path.is_file():
        raise MissingWeightsError(
            f"LPIPS linear heads not found: expected {lin_path} inside the installed `lpips` package. "
            "Reinstall it (`pip install --force-reinstall lpips`)."
        )
    ckpt = resolve_vgg16_checkpoint(vgg_ckpt_path) if pretrained_backbone else None
    # Build on the meta device: lpips constructs (and throws away) a full torchvision VGG16 including its
    # 120M-parameter classifier, whose random init alone takes seconds. Every tensor is filled below.
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # lpips passes torchvision's deprecated `pretrained=` argument
        # pnet_rand=True: lpips would otherwise ask torchvision to download the backbone.
        model = lpips.LPIPS(net="vgg", version="0.1", pretrained=False, pnet_rand=True, verbose=False)
    model = model.to_empty(device="cpu")
    state = {f"scaling_layer.{k}": v for k, v in lpips.lpips.ScalingLayer().state_dict().items()}
    lins = torch.load(lin_path, map_location="cpu", weights_only=True)  # keys lin0.model.1.weight, ...
    state.update(lins)
    # `model.lins` is a ModuleList over the same lin0..lin4 modules, so its keys alias them.
    state.update({f"lins.{k[3:]}": v for k, v in lins.items() if k.startswith("lin")})
    if ckpt is not None:
        vgg_state = torch.load(ckpt, map_location="cpu", weights_only=True)
        state.update(_vgg_features_state(vgg_state, ckpt))
    else:
        for module in model.net.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
        state.update({f"net.{k}": v for k, v in model.net.state_dict().items()})
    model.load_state_dict(state, strict=True)  # strict: no tensor may stay uninitialised
    model.requires_grad_(False)
    return model.eval().to(device)


def lpips_features(model: nn.Module, x: torch.Tensor, normalize: bool = False) -> list[torch.Tensor]:
    """Channel-normalised VGG features ``[B,C_l,H_l,W_l]`` for the 5 LPIPS layers of images ``x``.

    ``x`` in [-1, 1] like ``LPIPS.forward``; ``normalize=True`` accepts [0, 1].
    """
    import lpips

    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"lpips_features expects [B,3,H,W] images, got {tuple(x.shape)}")
    if normalize:
        x = 2 * x - 1
    if model.version == "0.1":
        x = model.scaling_layer(x)
    outs = model.net.forward(x)
    return [lpips.normalize_tensor(outs[k]) for k in range(model.L)]


def lpips_distance_from_features(
    model: nn.Module, fa: list[torch.Tensor], fb: list[torch.Tensor]
) -> torch.Tensor:
    """LPIPS distance ``[B]`` between two feature lists (batch sizes broadcast: 1 vs B is fine)."""
    if len(fa) != model.L or len(fb) != model.L:
        raise ValueError(f"expected {model.L} feature layers, got {len(fa)} and {len(fb)}")
    total = None
    for k in range(model.L):
        diff = (fa[k] - fb[k]) ** 2
        layer = model.lins[k](diff).mean([2, 3], keepdim=True)  # lpips' spatial_average
        total = layer if total is None else total + layer
    return total.flatten()
