"""The standard FID/IS Inception-v3 (TF ``inception-2015-12-05``), loaded offline, with three outputs.

``load_inception(path)`` returns an :class:`InceptionMetricsNet` whose ``forward(images, outputs)`` takes images
in the uint8 range [0, 255] (``[B,3,H,W]``, uint8 or float, any size; resized to 299 inside) and returns
a dict with any of

- ``"pool"``    ``[B,2048]`` pool3 features (FID, precision/recall),
- ``"probs"``   ``[B,1008]`` softmax class probabilities (Inception Score),
- ``"spatial"`` ``[B,2023]`` the first 7 channels of ``mixed_6/conv`` (17x17), flattened in TF's NHWC order,
  as in the ADM evaluator (sFID).

Two weight formats hold the same network:

1. The TorchScript file ``inception-2015-12-05.pt`` of StyleGAN2-ADA, used by clean-fid (which caches it at
   ``/tmp/inception-2015-12-05.pt``). Its ``forward(img, return_features, use_fp16, no_output_bias)`` gives
   pool3 or probs; ``spatial`` is taken from its submodules ``layers.{conv,...,mixed_5}`` then
   ``layers.mixed_6.conv``, the same way public sFID ports for this file do. pool3 and probs go through the
   same submodules (``layers`` then the ``output`` linear layer), so one pass yields all three.
2. The pytorch-fid / torch-fidelity state dict (``pt_inception-2015-12-05-6726825d.pth`` or
   ``weights-inception-2015-12-05-6726825d.pth`` in ``$TORCH_HOME/hub/checkpoints``), run on torchvision's
   Inception3 patched like pytorch-fid (TF average pooling, FC with 1008 classes). TF's ``mixed_6`` is
   torchvision's ``Mixed_6d``, its ``conv`` branch ``branch1x1``.

Both resize with the TorchScript model's own rule (bilinear ``grid_sample`` with the pixel grid
``x_in = i * W / 299``, i.e. TF1's ``resize_bilinear``); the TorchScript net normalises with
``(x - 128) / 128`` and the pytorch-fid net with ``x / 127.5 - 1`` as the respective originals do.

Inception Score follows StyleGAN2-ADA / Salimans et al.: ``no_output_bias=True`` (softmax of the logits
without the FC bias). ``build_random_inception`` is a random-weight stand-in with the same interface so the
metric code runs in tests without weights.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from utils.weights import MissingWeightsError

TORCHSCRIPT_FILENAME = "inception-2015-12-05.pt"
TORCHSCRIPT_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
PYTORCH_FID_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
OUTPUT_DIMS = {"pool": 2048, "probs": 1008, "spatial": 7 * 17 * 17}
INPUT_SIZE = 299
_TS_TRUNK = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1") + tuple(
    ["mixed"] + [f"mixed_{i}" for i in range(1, 11)]
)


def default_inception_paths() -> list[Path]:
    """Where clean-fid, pytorch-fid and torch-fidelity keep their copies, in the order they are tried."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return [
        Path(tempfile.gettempdir()) / TORCHSCRIPT_FILENAME,  # clean-fid's `feature_extractor` cache dir
        hub / PYTORCH_FID_FILENAME,
        hub / TORCH_FIDELITY_FILENAME,
    ]


def _how_to_get() -> str:
    return (
        f"Download {TORCHSCRIPT_URL} (the StyleGAN2-ADA / clean-fid TorchScript file) on a machine with network "
        f"and pass it with --inception_path, or copy it to {default_inception_paths()[0]}; the pytorch-fid "
        f"weights {PYTORCH_FID_URL} work too (copy to {default_inception_paths()[1]})."
    )


def resize_like_tf(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Bilinear resize with the sampling grid of the TorchScript Inception (``x_in = i * W / size``)."""
    b, _, h, w = x.shape
    if h == size and w == size:
        return x
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = F.affine_grid(theta.unsqueeze(0).repeat(b, 1, 1), [b, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _spatial_from_map(fmap: torch.Tensor) -> torch.Tensor:
    # ADM evaluator: spatial[..., :7] of the NHWC tensor, reshaped to [B, 7*17*17].
    return fmap[:, :7].permute(0, 2, 3, 1).flatten(1)


class InceptionMetricsNet(nn.Module):
    """Common interface: ``forward(images_0_255, outputs=("pool",)) -> {name: tensor}``."""

    def __init__(self, no_output_bias: bool = True) -> None:
        super().__init__()
        self.no_output_bias = no_output_bias

    def _check(self, images: torch.Tensor, outputs: Sequence[str]) -> torch.Tensor:
        unknown = set(outputs) - set(OUTPUT_DIMS)
        if unknown or not outputs:
            raise ValueError(f"unknown inception outputs {sorted(unknown)}; choose from {list(OUTPUT_DIMS)}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"inception expects [B,3,H,W] images in [0,255], got {tuple(images.shape)}")
        return images.float()

    def _probs(self, pool: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
        logits = F.linear(pool, fc.weight, None if self.no_output_bias else fc.bias)
        return logits.softmax(dim=1)


class TorchScriptInception(InceptionMetricsNet):
    """Wraps StyleGAN2-ADA's ``inception-2015-12-05.pt`` TorchScript module."""

    def __init__(self, module: torch.jit.ScriptModule, no_output_bias: bool = True) -> None:
        super().__init__(no_output_bias)
        self.base = module.eval()
        children = dict(module.layers.named_children()) if hasattr(module, "layers") else {}
        self.trunk_ok = all(name in children for name in _TS_TRUNK)
        self.spatial_ok = self.trunk_ok and hasattr(children["mixed_6"], "conv")
        self.fc = getattr(module, "output", None)
        self.fc_ok = self.fc is not None and hasattr(self.fc, "weight") and hasattr(self.fc, "bias")

    @torch.no_grad()
    def forward(self, images: torch.Tensor, outputs: Sequence[str] = ("pool",)) -> dict[str, torch.Tensor]:
        x = self._check(images, outputs)
        if not self.trunk_ok:  # unknown layout: only the documented entry point
            if "spatial" in outputs:
                raise RuntimeError(
                    "this TorchScript Inception has no `layers.mixed_6.conv` submodule; sFID's spatial "
                    f"features need the StyleGAN2-ADA file {TORCHSCRIPT_URL} or the pytorch-fid weights"
                )
            out = {}
            if "pool" in outputs:
                out["pool"] = self.base(x, return_features=True)
            if "probs" in outputs:
                out["probs"] = self.base(x, no_output_bias=self.no_output_bias)
            return out
        h = (resize_like_tf(x) - 128.0) / 128.0
        out: dict[str, torch.Tensor] = {}
        # `layers` is an nn.Sequential (clean-fid calls `layers.forward` for pool3); walk it in order so the
        # spatial map can be read off `mixed_6.conv` on the way.
        for name, layer in self.base.layers.named_children():
            if name == "mixed_6" and "spatial" in outputs:
                out["spatial"] = _spatial_from_map(layer.conv(h))
            h = layer(h)
        pool = h.flatten(1) if h[0].numel() == OUTPUT_DIMS["pool"] else F.adaptive_avg_pool2d(h, 1).flatten(1)
        if "pool" in outputs:
            out["pool"] = pool
        if "probs" in outputs:
            if self.fc_ok:
                out["probs"] = self._probs(pool, self.fc)
            else:
                out["probs"] = self.base(x, no_output_bias=self.no_output_bias)
        return out


class TorchvisionFIDInception(InceptionMetricsNet):
    """torchvision Inception3 patched like pytorch-fid (TF pooling, 1008 classes)."""

    def __init__(self, net: nn.Module, no_output_bias: bool = True) -> None:
        super().__init__(no_output_bias)
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, outputs: Sequence[str] = ("pool",)) -> dict[str, torch.Tensor]:
        x = self._check(images, outputs)
        n = self.net
        h = resize_like_tf(x) / 127.5 - 1.0
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1"):
            h = getattr(n, name)(h)
        for name in ("Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a"):
            h = getattr(n, name)(h)
        h = n.Mixed_6c(n.Mixed_6b(h))
        out: dict[str, torch.Tensor] = {}
        if "spatial" in outputs:
            out["spatial"] = _spatial_from_map(n.Mixed_6d.branch1x1(h))  # TF mixed_6/conv
        for name in ("Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            h = getattr(n, name)(h)
        pool = F.adaptive_avg_pool2d(h, 1).flatten(1)
        if "pool" in outputs:
            out["pool"] = pool
        if "probs" in outputs:
            out["probs"] = self._probs(pool, n.fc)
        return out


def build_fid_inception_v3() -> nn.Module:
    """pytorch-fid's architecture (``fid_inception_v3`` without its download), default-initialised."""
    import torchvision
    from cleanfid.inception_pytorch import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2

    net = torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=1008
    )
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


def build_random_inception(seed: int = 0, device: str | torch.device = "cpu") -> InceptionMetricsNet:
    """Random-weight stand-in with the real interface (tests, timing). Its scores mean nothing."""
    torch.manual_seed(seed)
    return TorchvisionFIDInception(build_fid_inception_v3()).to(device)


def _load_file(path: Path, device: str | torch.device, no_output_bias: bool) -> InceptionMetricsNet:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError):
        module = None
    if module is not None:
        return TorchScriptInception(module, no_output_bias).to(device)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path} is neither the TorchScript {TORCHSCRIPT_FILENAME} nor a pytorch-fid state dict: {err}"
        ) from err
    net = build_fid_inception_v3()
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} is not a pytorch-fid / torch-fidelity Inception state dict: {err}") from err
    return TorchvisionFIDInception(net, no_output_bias).to(device)


def resolve_inception_path(path: str | os.PathLike | None = None) -> Path:
    """The weights file: ``path`` (a file, or a directory holding one of the known names), else a cache."""
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            for name in (TORCHSCRIPT_FILENAME, PYTORCH_FID_FILENAME, TORCH_FIDELITY_FILENAME):
                if (p / name).is_file():
                    return p / name
            raise MissingWeightsError(
                f"Inception weights not found: the directory {p} holds none of {TORCHSCRIPT_FILENAME}, "
                f"{PYTORCH_FID_FILENAME}, {TORCH_FIDELITY_FILENAME}. " + _how_to_get()
            )
        if p.is_file():
            return p
        raise MissingWeightsError(f"Inception weights not found: {p} does not exist. " + _how_to_get())
    for candidate in default_inception_paths():
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in default_inception_paths())
    raise MissingWeightsError(
        f"Inception weights not found: no --inception_path given and none of the caches exist ({tried}). "
        + _how_to_get()
    )


def load_inception(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu", no_output_bias: bool = True
) -> InceptionMetricsNet:
    """Load the FID/IS Inception from ``path`` or the clean-fid / pytorch-fid / torch-fidelity caches.

    ``no_output_bias=True`` reproduces the original Inception Score (StyleGAN2-ADA passes the same flag).
    """
    return _load_file(resolve_inception_path(path), device, no_output_bias)
