"""The FID/IS Inception-v3 (TF ``inception-2015-12-05``), located offline and run by the reference tools.

FID and KID go through clean-fid's own code (``cleanfid``): its image resizer and its feature extractor for the
chosen mode, built from the weight file this module locates (clean-fid would otherwise download to ``/tmp``).
Inception Score goes through torch-fidelity (``eval/compute_is.py``). What clean-fid lacks is added here:

- sFID's spatial features, defined as in the ADM evaluator (guided-diffusion ``evaluations/evaluator.py``):
  ``FID_SPATIAL_NAME = "mixed_6/conv:0"`` (the 1x1 ``conv`` branch of TF block ``mixed_6``, torchvision
  ``Mixed_6d.branch1x1``, 17x17 at 299 px), ``spatial[..., :7]`` on the NHWC tensor, reshaped to
  ``[N, 7*17*17 = 2023]`` (index ``(h*17 + w)*7 + c``). They come from the same forward pass as pool3, on the
  same clean-fid-resized input.

Weight files (never downloaded; ``resolve_inception_path``):

1. ``inception-2015-12-05.pt``, StyleGAN2-ADA's TorchScript file, what clean-fid's ``mode="clean"`` runs
   (``cleanfid.inception_torchscript.InceptionV3W``; clean-fid caches it at ``/tmp/inception-2015-12-05.pt``).
   Its ``layers`` Sequential gives pool3; the spatial map is read off ``layers.mixed_6.conv`` while walking
   ``layers`` in order (the layout public sFID ports of this file use).
2. The pytorch-fid / torch-fidelity state dict (``pt_inception-2015-12-05-6726825d.pth`` /
   ``weights-inception-2015-12-05-6726825d.pth``, the same weights): what clean-fid's ``mode="legacy_pytorch"``
   runs (``cleanfid.inception_pytorch.InceptionV3``, loaded from torch hub's ``checkpoints`` directory, which
   is pointed at the located file) and what torch-fidelity's Inception Score runs.

``write_random_torchscript_inception`` / ``write_random_fid_state_dict`` write random-weight files with those
interfaces (tests, smoke runs: their scores mean nothing).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
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
TORCH_FIDELITY_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
FID_MODES = ("clean", "legacy_pytorch")  # clean-fid modes; "clean" is clean-fid's default
INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS, SPATIAL_GRID = 7, 17
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_GRID * SPATIAL_GRID  # 2023
FEATURE_DIMS = {"pool": POOL_DIM, "spatial": SPATIAL_DIM}


def default_inception_paths(prefer: str = "torchscript") -> list[Path]:
    """Where clean-fid, pytorch-fid and torch-fidelity keep their copies, in the order they are tried.

    ``prefer="torchscript"`` (FID: clean-fid's default mode) tries clean-fid's TorchScript copy first;
    ``prefer="state_dict"`` (Inception Score: torch-fidelity) tries the state dicts first.
    """
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    torchscript = [
        Path(tempfile.gettempdir()) / TORCHSCRIPT_FILENAME
    ]  # clean-fid's `feature_extractor` cache
    state_dicts = [hub / TORCH_FIDELITY_FILENAME, hub / PYTORCH_FID_FILENAME]
    if prefer == "state_dict":
        return state_dicts + torchscript
    return torchscript + state_dicts[::-1]


def _how_to_get() -> str:
    return (
        f"Download {TORCHSCRIPT_URL} (the StyleGAN2-ADA / clean-fid TorchScript file) on a machine with network "
        f"and pass it with --inception_path, or copy it to {Path(tempfile.gettempdir()) / TORCHSCRIPT_FILENAME}; "
        f"the torch-fidelity / pytorch-fid weights {TORCH_FIDELITY_URL} (same weights as {PYTORCH_FID_URL}) work "
        f"too (copy to {Path(torch.hub.get_dir()) / 'checkpoints' / TORCH_FIDELITY_FILENAME})."
    )


def resolve_inception_path(path: str | os.PathLike | None = None, prefer: str = "torchscript") -> Path:
    """The weights file: ``path`` (a file, or a directory holding one of the known names), else a cache."""
    names = [p.name for p in default_inception_paths(prefer)]
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            for name in names:
                if (p / name).is_file():
                    return p / name
            raise MissingWeightsError(
                f"Inception weights not found: the directory {p} holds none of {', '.join(names)}. "
                + _how_to_get()
            )
        if p.is_file():
            return p
        raise MissingWeightsError(f"Inception weights not found: {p} does not exist. " + _how_to_get())
    for candidate in default_inception_paths(prefer):
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in default_inception_paths(prefer))
    raise MissingWeightsError(
        f"Inception weights not found: no --inception_path given and none of the caches exist ({tried}). "
        + _how_to_get()
    )


def weights_format(path: str | os.PathLike) -> str:
    """``"torchscript"`` (a TorchScript archive: it holds serialized ``code/``) or ``"state_dict"``."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if any("/code/" in name for name in zf.namelist()):
                return "torchscript"
    return "state_dict"


def adm_spatial_features(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """ADM's sFID features from the ``mixed_6/conv`` map ``[B, C, 17, 17]``: NHWC ``[..., :7]`` -> ``[B, 2023]``."""
    if mixed_6_conv.ndim != 4 or mixed_6_conv.shape[1] < SPATIAL_CHANNELS:
        raise ValueError(f"mixed_6/conv map must be [B, >= 7, H, W], got {tuple(mixed_6_conv.shape)}")
    return mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)


def _place(path: Path, link: Path) -> None:
    """``link`` -> ``path`` (a symlink; a copy where the file system has none)."""
    try:
        link.symlink_to(path.resolve())
    except OSError:
        import shutil

        shutil.copyfile(path, link)


@contextlib.contextmanager
def _file_as(path: Path, name: str) -> Iterator[Path]:
    """A directory holding ``path`` under ``name`` (its own directory, or a temporary one with a link)."""
    if path.name == name:
        yield path.parent
        return
    with tempfile.TemporaryDirectory(prefix="inception_") as tmp:
        _place(path, Path(tmp) / name)
        yield Path(tmp)


@contextlib.contextmanager
def _torch_hub_checkpoint(path: Path, name: str) -> Iterator[None]:
    """Make ``torch.hub.load_state_dict_from_url(<url ending in name>)`` find ``path`` (no download)."""
    with tempfile.TemporaryDirectory(prefix="torch_hub_") as hub:
        (Path(hub) / "checkpoints").mkdir()
        _place(path, Path(hub) / "checkpoints" / name)
        previous = torch.hub._hub_dir  # restored as it was (None = follow $TORCH_HOME)
        torch.hub.set_dir(hub)
        try:
            yield
        finally:
            torch.hub._hub_dir = previous


class CleanFIDInception:
    """clean-fid's Inception feature extractor for ``mode``, from a local weight file, plus sFID's spatial features.

    ``mode=None`` picks the mode the file serves: ``"clean"`` for the TorchScript file, ``"legacy_pytorch"`` for
    the pytorch-fid state dict. ``pool(x)`` is exactly clean-fid's feature function of that mode (what
    ``cleanfid.fid.compute_fid(..., mode=mode)`` runs on each clean-fid-resized ``[B,3,299,299]`` batch in
    [0, 255]); ``pool_and_spatial(x)`` adds the spatial features from the same pass; ``resize(images)`` is
    clean-fid's resizer of the mode applied per image, as clean-fid does for in-memory (generator) images.
    ``self(images_0_255, outputs=("pool", "spatial"))`` does both (any size, uint8 range).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        mode: str | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        from cleanfid.resize import build_resizer

        self.path = resolve_inception_path(path)
        fmt = weights_format(self.path)
        if mode is None:
            mode = "clean" if fmt == "torchscript" else "legacy_pytorch"
        if mode not in FID_MODES:
            raise ValueError(f"FID mode must be one of {FID_MODES}, got {mode!r}")
        needed = "torchscript" if mode == "clean" else "state_dict"
        if fmt != needed:
            wanted = TORCHSCRIPT_FILENAME if mode == "clean" else PYTORCH_FID_FILENAME
            raise ValueError(
                f"clean-fid's mode {mode!r} runs {wanted}, but {self.path} is a {fmt.replace('_', ' ')} file; "
                f"pass that file with --inception_path or choose the mode the file serves "
                f"({'clean' if fmt == 'torchscript' else 'legacy_pytorch'})."
            )
        self.mode = mode
        self.device = torch.device(device)
        self.fn_resize = build_resizer(mode)
        if mode == "clean":
            from cleanfid.inception_torchscript import InceptionV3W

            with _file_as(self.path, TORCHSCRIPT_FILENAME) as folder:
                self.model = InceptionV3W(str(folder), download=False, resize_inside=False)
            children = dict(self.model.layers.named_children())
            self.spatial_ok = "mixed_6" in children and hasattr(children["mixed_6"], "conv")
        else:
            from cleanfid.inception_pytorch import InceptionV3

            with _torch_hub_checkpoint(self.path, PYTORCH_FID_FILENAME):
                self.model = InceptionV3(output_blocks=[3], resize_input=False)  # as cleanfid.features
            self.spatial_ok = True
        self.model = self.model.to(self.device).eval()
        st = self.path.stat()
        # What the features depend on (for caches of reference statistics): mode and weight file.
        self.id = f"cleanfid-{self.mode}:{self.path.resolve()}:{st.st_size}:{int(st.st_mtime)}"

    def eval(self) -> CleanFIDInception:
        return self

    @torch.no_grad()
    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """clean-fid's features of resized ``[B,3,299,299]`` images in [0, 255] (``cleanfid.features``)."""
        x = x.to(self.device)
        if self.mode == "clean":
            return self.model(x)
        return self.model(x / 255)[0].squeeze(-1).squeeze(-1)

    @torch.no_grad()
    def pool_and_spatial(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool3 ``[B,2048]``, ADM spatial ``[B,2023]``) of resized images, one pass, same ops as ``pool``."""
        if not self.spatial_ok:
            raise RuntimeError(
                f"{self.path} has no `layers.mixed_6.conv` submodule: sFID's spatial features need the "
                f"StyleGAN2-ADA file {TORCHSCRIPT_URL} or the pytorch-fid weights ({PYTORCH_FID_URL})"
            )
        x = x.to(self.device)
        spatial = None
        if self.mode == "clean":
            h = (x - 128) / 128  # InceptionV3W.forward's normalisation
            for name, layer in self.model.layers.named_children():  # = layers.forward, step by step
                if name == "mixed_6":
                    spatial = adm_spatial_features(layer.conv(h))
                h = layer(h)
            return h.view(x.shape[0], POOL_DIM), spatial
        h = 2 * (x / 255) - 1  # InceptionV3.forward with normalize_input
        blocks = self.model.blocks
        h = blocks[1](blocks[0](h))
        for i, layer in enumerate(blocks[2]):  # Mixed_5b .. Mixed_6e; index 6 is Mixed_6d (TF mixed_6)
            if i == 6:
                spatial = adm_spatial_features(layer.branch1x1(h))
            h = layer(h)
        return blocks[3](h).squeeze(-1).squeeze(-1), spatial

    def feature_fn(self, spatial: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        """The ``model`` argument of clean-fid's feature functions: pool3, or ``[pool3 | spatial]`` concatenated."""
        if not spatial:
            return self.pool
        return lambda x: torch.cat(self.pool_and_spatial(x), dim=1)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """clean-fid's resizer of the mode, per image, as ``cleanfid.fid.get_model_features`` applies it."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"inception expects [B,3,H,W] images in [0,255], got {tuple(images.shape)}")
        out = [
            torch.from_numpy(
                np.ascontiguousarray(self.fn_resize(img.numpy().transpose(1, 2, 0)).transpose(2, 0, 1))
            )
            for img in images.detach().float().cpu()
        ]
        return torch.stack(out)

    def __call__(self, images: torch.Tensor, outputs: Sequence[str] = ("pool",)) -> dict[str, torch.Tensor]:
        """Features of ``[B,3,H,W]`` images in [0, 255] (any size): {"pool": [B,2048], "spatial": [B,2023]}."""
        unknown = set(outputs) - set(FEATURE_DIMS)
        if unknown or not outputs:
            raise ValueError(f"unknown inception outputs {sorted(unknown)}; choose from {list(FEATURE_DIMS)}")
        x = self.resize(images)
        if "spatial" in outputs:
            pool, spatial = self.pool_and_spatial(x)
            return {"pool": pool, "spatial": spatial} if "pool" in outputs else {"spatial": spatial}
        return {"pool": self.pool(x)}


def load_inception(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu", mode: str | None = None
) -> CleanFIDInception:
    """clean-fid's Inception for FID / KID / sFID from ``path`` or the clean-fid / pytorch-fid caches."""
    return CleanFIDInception(path, mode=mode, device=device)


# ---------------------------------------------------------------------------------------------- random stand-ins


class _ConvReLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class _Mixed(nn.Module):
    """A block with a 1x1 ``conv`` branch concatenated first, like TF's ``mixed_6``."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv = _ConvReLU(cin, 16, 1)
        self.tower = _ConvReLU(cin, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x)], dim=1)


class _TinyTorchScriptInception(nn.Module):
    """StyleGAN2-ADA's TorchScript interface (``layers`` -> ``[B,2048,1,1]`` on 299 px, ``layers.mixed_6.conv`` at
    17x17, ``output`` FC 2048 -> 1008, ``forward(img, return_features, use_fp16, no_output_bias)``), tiny."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            OrderedDict(
                conv=_ConvReLU(3, 16, 3, 2),  # 149
                conv_1=_ConvReLU(16, 32, 3, 2),  # 74
                conv_2=_ConvReLU(32, 32, 3, 2),  # 36
                conv_3=_ConvReLU(32, 32, 3, 2),  # 17
                mixed_6=_Mixed(32),
                mixed_10=_ConvReLU(32, POOL_DIM, 1),
                pool2=nn.AdaptiveAvgPool2d(1),
            )
        )
        self.output = nn.Linear(POOL_DIM, 1008)

    def forward(
        self,
        img: torch.Tensor,
        return_features: bool = False,
        use_fp16: bool = False,
        no_output_bias: bool = False,
    ) -> torch.Tensor:
        x = F.interpolate(img.float(), size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128) / 128).flatten(1)
        if return_features:
            return features
        logits = features @ self.output.weight.t()
        if not no_output_bias:
            logits = logits + self.output.bias
        return logits.softmax(dim=1)


def write_random_torchscript_inception(path: str | os.PathLike, seed: int = 0) -> Path:
    """A small random TorchScript file with the interface clean-fid's ``mode="clean"`` and the sFID code use."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = torch.jit.script(_TinyTorchScriptInception().eval())
    module.save(str(path))
    return path


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


@torch.no_grad()
def write_random_fid_state_dict(path: str | os.PathLike, seed: int = 0) -> Path:
    """A random state dict in the pytorch-fid / torch-fidelity layout (both load it strictly).

    BatchNorm running statistics are set from one batch of smooth random images (upsampled 16 px noise, like
    small test images), so activations stay O(1) through the 94 layers (with the default running_var = 1
    pool3 would be ~1e-8 and every score degenerate).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_fid_inception_v3()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one batch -> exactly its statistics
        smooth = F.interpolate(torch.rand(8, 3, 16, 16), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear")
        net.train()(smooth * 2 - 1)
    torch.save(net.eval().state_dict(), path)
    return path
