"""The one DINOv2 adapter of the repo: frozen ViT-*/14 features for REPA, DinoVQ, GlobalPercLoss and caches.

Internally a transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (so Hugging Face weights load natively);
official torch.hub checkpoints (``dinov2_vitb14_pretrain.pth``: fused ``qkv``, ``ls1.gamma``, ``pos_embed``...)
are converted on load, strictly. The forward pass re-implements only the token preparation so that

* the positional-embedding interpolation is the official one (see ``_interpolate_pos_embed``), and
* only as many blocks run as the deepest requested output needs.

    enc = DINOv2Encoder.from_pretrained("facebook/dinov2-base", variant="vitb14", resolution=224,
                                        input_range="-1_1")
    out = enc(images, layers=[3, 6], return_cls=True)   # out.patch_tokens [B, 256, 768], out.grid (16, 16)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PreTrainedModel,
)

from models.dinov2_keys import (
    _BLOCK_RE,
    _hf_to_official,
    _model_state_modern,
    _modern_to_legacy,
    _official_to_hf,
    uses_legacy_hf_names,
)
from utils.checkpoint import atomic_write, torch_save_atomic
from utils.weights import (
    MissingWeightsError,
    hf_download_hint,
    looks_like_hub_id,
    require_file,
    resolve_hf_path,
)

__all__ = [
    "DINOv2Encoder",
    "DINOv2Output",
    "VARIANTS",
    "INPUT_RANGES",
    "export_official_state_dict",
    "save_official_checkpoint",
    "official_checkpoint_name",
    "grid_size",
    "hf_config",
]

PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_RANGES = ("-1_1", "0_1")
OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"


@dataclass(frozen=True)
class VariantSpec:
    depth: int
    embed_dim: int
    num_heads: int
    num_register_tokens: int = 0
    swiglu: bool = False
    image_size: int = 518  # the pretraining resolution: pos_embed holds (518/14)^2 + 1 = 1370 positions
    hf_id: str | None = None
    # Official torch.hub constructors: plain models interpolate with a +0.1 offset and no antialias,
    # register models with no offset and antialias (dinov2/hub/backbones.py).
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False


def _reg(spec: VariantSpec, hf_id: str | None) -> VariantSpec:
    return VariantSpec(
        depth=spec.depth,
        embed_dim=spec.embed_dim,
        num_heads=spec.num_heads,
        num_register_tokens=4,
        swiglu=spec.swiglu,
        image_size=spec.image_size,
        hf_id=hf_id,
        interpolate_offset=0.0,
        interpolate_antialias=True,
    )


_BASE = {
    "vits14": VariantSpec(12, 384, 6, hf_id="facebook/dinov2-small"),
    "vitb14": VariantSpec(12, 768, 12, hf_id="facebook/dinov2-base"),
    "vitl14": VariantSpec(24, 1024, 16, hf_id="facebook/dinov2-large"),
    "vitg14": VariantSpec(40, 1536, 24, swiglu=True, hf_id="facebook/dinov2-giant"),
    # test-only: same architecture family at toy size; pos_embed for 56 px (4x4 grid) so interpolation is exercised
    "tiny14": VariantSpec(4, 64, 4, image_size=56),
}
VARIANTS: dict[str, VariantSpec] = {}
for _name, _spec in _BASE.items():
    VARIANTS[_name] = _spec
    _size = {"vits14": "small", "vitb14": "base", "vitl14": "large", "vitg14": "giant"}.get(_name)
    VARIANTS[f"{_name}_reg"] = _reg(_spec, f"facebook/dinov2-with-registers-{_size}" if _size else None)


def _spec(variant: str) -> VariantSpec:
    if variant not in VARIANTS:
        raise ValueError(f"Unknown DINOv2 variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def official_checkpoint_name(variant: str) -> str:
    """File name of the official torch.hub checkpoint, e.g. ``dinov2_vitb14_reg4_pretrain.pth``."""
    spec = _spec(variant)
    arch = variant.removesuffix("_reg")
    suffix = f"_reg{spec.num_register_tokens}" if spec.num_register_tokens else ""
    return f"dinov2_{arch}{suffix}_pretrain.pth"


def _official_url(variant: str) -> str:
    arch = variant.removesuffix("_reg")
    return f"{OFFICIAL_BASE_URL}/dinov2_{arch}/{official_checkpoint_name(variant)}"


def _how_to_get(variant: str) -> str:
    spec = _spec(variant)
    if spec.hf_id is None:
        return "Test-only variant: generate it offline with `python preprocessing/make_tiny_assets.py --out .cache/tiny`."
    return (
        f"Expected either the official torch.hub checkpoint (a state dict with cls_token, pos_embed, blocks.N.attn.qkv, "
        f"...) downloaded from {_official_url(variant)} into $TORCH_HOME/hub/checkpoints/ (default "
        f"~/.cache/torch/hub/checkpoints/), or a Hugging Face model: on a machine with network run "
        f"{hf_download_hint(spec.hf_id)} and copy the HF cache here (use HF_HUB_OFFLINE=1), "
        f"or pass the downloaded directory."
    )


def grid_size(resolution: int, patch_size: int = PATCH_SIZE) -> tuple[int, int]:
    """Token grid of a square ``resolution`` input: 224 -> (16, 16)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if resolution % patch_size:
        lower = resolution // patch_size * patch_size
        raise ValueError(
            f"resolution {resolution} is not a multiple of the patch size {patch_size}; "
            f"use e.g. {max(lower, patch_size)} or {lower + patch_size}"
        )
    return resolution // patch_size, resolution // patch_size


def hf_config(variant: str, image_size: int | None = None) -> Dinov2Config | Dinov2WithRegistersConfig:
    """The transformers config that builds ``variant`` (no weights are created)."""
    spec = _spec(variant)
    common = dict(
        hidden_size=spec.embed_dim,
        num_hidden_layers=spec.depth,
        num_attention_heads=spec.num_heads,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=image_size or spec.image_size,
        patch_size=PATCH_SIZE,
        num_channels=3,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=spec.swiglu,
    )
    if spec.num_register_tokens:
        return Dinov2WithRegistersConfig(num_register_tokens=spec.num_register_tokens, **common)
    return Dinov2Config(use_mask_token=True, **common)


def _model_class(spec: VariantSpec) -> type[PreTrainedModel]:
    return Dinov2WithRegistersModel if spec.num_register_tokens else Dinov2Model


def export_official_state_dict(encoder: DINOv2Encoder) -> dict[str, torch.Tensor]:
    """The encoder's weights in the official torch.hub layout (fused qkv / w12, ``ls1.gamma``, ``pos_embed``...)."""
    return _hf_to_official(_model_state_modern(encoder.model))


def save_official_checkpoint(encoder: DINOv2Encoder, path: str | os.PathLike) -> Path:
    """Write the encoder as an official-layout ``.pth`` (atomically), loadable by ``from_pretrained(path)``."""
    return torch_save_atomic({k: v.cpu() for k, v in export_official_state_dict(encoder).items()}, path)


def _infer_variant(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Name of the variant whose shapes match an official-layout state dict (for error hints)."""
    try:
        dim = state_dict["cls_token"].shape[-1]
        depth = len({m.group(1) for k in state_dict if (m := _BLOCK_RE.match(k))})
        registers = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    except (KeyError, IndexError, AttributeError):
        return None
    for name, spec in VARIANTS.items():
        if (spec.embed_dim, spec.depth, spec.num_register_tokens) == (dim, depth, registers):
            return name
    return None


def _format_keys(keys: list[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ---------------------------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DINOv2Output:
    patch_tokens: torch.Tensor | None  # [B, N, D] final-LayerNorm patch tokens, registers excluded
    cls: torch.Tensor | None  # [B, D] final-LayerNorm CLS token
    intermediate: dict[int, torch.Tensor] = field(default_factory=dict)  # block idx -> [B, N, D], no norm
    grid: tuple[int, int] = (0, 0)  # (h, w) of the patch grid; N = h * w


class DINOv2Encoder(nn.Module):
    """Frozen DINOv2 ViT-*/14 feature extractor (random init here; use ``from_pretrained`` for real weights)."""

    def __init__(
        self,
        *,
        variant: str = "vitb14",
        resolution: int = 224,
        input_range: str = "-1_1",
        model: PreTrainedModel | None = None,
    ) -> None:
        super().__init__()
        spec = _spec(variant)
        if input_range not in INPUT_RANGES:
            raise ValueError(
                f"input_range must be one of {INPUT_RANGES} (state it explicitly), got {input_range!r}"
            )
        grid_size(resolution)  # validates the multiple of 14
        self.variant = variant
        self.spec = spec
        self.resolution = resolution
        self.input_range = input_range
        self.patch_size = PATCH_SIZE
        self.embed_dim = spec.embed_dim
        self.depth = spec.depth
        self.num_heads = spec.num_heads
        self.num_register_tokens = spec.num_register_tokens
        self.model = model if model is not None else _model_class(spec)(hf_config(variant))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    # -- loading -------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike | None,
        *,
        variant: str = "vitb14",
        resolution: int = 224,
        input_range: str = "-1_1",
    ) -> DINOv2Encoder:
        """Load real weights, offline.

        ``source``: an official torch.hub ``.pth`` file; a local Hugging Face model directory; a hub id such as
        ``facebook/dinov2-base`` found in the local HF cache; or ``None`` for the torch.hub cache file
        ``$TORCH_HOME/hub/checkpoints/dinov2_<arch>[_reg4]_pretrain.pth``. Any missing or unexpected key is an error.
        """
        _spec(variant)
        if source is None:
            path = Path(torch.hub.get_dir()) / "checkpoints" / official_checkpoint_name(variant)
            require_file(
                path, f"DINOv2 {variant} official checkpoint (torch.hub cache)", _how_to_get(variant)
            )
            return cls._from_official(path, variant=variant, resolution=resolution, input_range=input_range)
        path = Path(source).expanduser()
        if path.is_file():
            return cls._from_official(path, variant=variant, resolution=resolution, input_range=input_range)
        is_checkpoint_name = path.suffix in (".pth", ".pt", ".bin", ".safetensors")
        if path.is_dir() or (looks_like_hub_id(str(source)) and not is_checkpoint_name):
            return cls._from_hf(str(source), variant=variant, resolution=resolution, input_range=input_range)
        raise MissingWeightsError(
            f"DINOv2 {variant} weights not found: {path} is neither a file (official .pth checkpoint) nor a "
            f"directory (Hugging Face format) nor a hub id. {_how_to_get(variant)}"
        )

    @classmethod
    def _from_official(cls, path: Path, *, variant: str, resolution: int, input_range: str) -> DINOv2Encoder:
        spec = _spec(variant)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            try:
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:
                raise ValueError(f"cannot read {path} as a torch checkpoint: {err}") from err
        if not isinstance(state_dict, dict) or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()
        ):
            raise ValueError(
                f"{path} is not an official DINOv2 state dict (a flat dict of tensors with keys cls_token, "
                f"pos_embed, patch_embed.proj.weight, blocks.N.attn.qkv.weight, ...); top-level keys: "
                f"{_format_keys([str(k) for k in state_dict]) if isinstance(state_dict, dict) else type(state_dict)}"
            )
        # A checkpoint trained at another resolution carries another pos_embed length: build the matching table.
        image_size = spec.image_size
        if "pos_embed" in state_dict:
            side = math.isqrt(state_dict["pos_embed"].shape[1] - 1)
            if side * side == state_dict["pos_embed"].shape[1] - 1:
                image_size = side * PATCH_SIZE
        # Built on the meta device: random init of vitg14 (1.1B params) would cost longer than loading it.
        with torch.device("meta"):
            model = _model_class(spec)(hf_config(variant, image_size=image_size))
        encoder = cls(variant=variant, resolution=resolution, input_range=input_range, model=model)
        encoder._load_official_state_dict(state_dict, source=str(path))
        return encoder

    def _load_official_state_dict(
        self, state_dict: dict[str, torch.Tensor], source: str = "state dict"
    ) -> None:
        expected = {k: v.shape for k, v in _hf_to_official(_model_state_modern(self.model)).items()}
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        guess = _infer_variant(state_dict)
        hint = f" The checkpoint looks like variant {guess!r}." if guess and guess != self.variant else ""
        if missing or unexpected:
            lines = [
                f"  {label} ({len(keys)}): {_format_keys(keys)}"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected))
                if keys
            ]
            raise ValueError(
                f"{source} does not match the official DINOv2 {self.variant} layout.{hint}\n"
                + "\n".join(lines)
            )
        mismatched = [
            f"{k}: checkpoint {tuple(state_dict[k].shape)} vs expected {tuple(shape)}"
            for k, shape in expected.items()
            if state_dict[k].shape != shape
        ]
        if mismatched:
            raise ValueError(
                f"{source} has wrong shapes for DINOv2 {self.variant}.{hint}\n  "
                + "\n  ".join(mismatched[:20])
            )
        converted, unknown = _official_to_hf(state_dict)
        assert not unknown, unknown  # every key was checked against the expected layout above
        if uses_legacy_hf_names(self.model):
            converted = _modern_to_legacy(converted)
        on_meta = any(p.is_meta for p in self.model.parameters())
        converted = {k: v.float().contiguous() for k, v in converted.items()}
        result = self.model.load_state_dict(converted, strict=True, assign=on_meta)
        assert not result.missing_keys and not result.unexpected_keys
        self.requires_grad_(False)

    @classmethod
    def _from_hf(cls, name_or_path: str, *, variant: str, resolution: int, input_range: str) -> DINOv2Encoder:
        spec = _spec(variant)
        what = f"DINOv2 {variant} (Hugging Face format)"
        directory = resolve_hf_path(name_or_path, what, _how_to_get(variant), required_files=("config.json",))
        model_class = _model_class(spec)
        config = model_class.config_class.from_pretrained(directory)
        expected_type = model_class.config_class.model_type
        if config.model_type != expected_type:
            raise ValueError(
                f"{directory} holds a {config.model_type!r} model but variant {variant!r} needs {expected_type!r} "
                f"({'with' if spec.num_register_tokens else 'without'} register tokens)"
            )
        found = {
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "patch_size": config.patch_size,
            "use_swiglu_ffn": config.use_swiglu_ffn,
            "num_register_tokens": getattr(config, "num_register_tokens", 0),
        }
        wanted = {
            "hidden_size": spec.embed_dim,
            "num_hidden_layers": spec.depth,
            "num_attention_heads": spec.num_heads,
            "patch_size": PATCH_SIZE,
            "use_swiglu_ffn": spec.swiglu,
            "num_register_tokens": spec.num_register_tokens,
        }
        wrong = {k: (found[k], wanted[k]) for k in wanted if found[k] != wanted[k]}
        if wrong:
            detail = ", ".join(f"{k}={got} (expected {exp})" for k, (got, exp) in wrong.items())
            raise ValueError(f"{directory} is not DINOv2 {variant}: {detail}")
        model, info = model_class.from_pretrained(directory, output_loading_info=True)
        problems = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys")}
        problems["mismatched_keys"] = sorted(map(str, info.get("mismatched_keys") or ()))
        if any(problems.values()):
            raise ValueError(
                f"{directory} does not match DINOv2 {variant}:\n"
                + "\n".join(f"  {k} ({len(v)}): {_format_keys(v)}" for k, v in problems.items() if v)
            )
        return cls(variant=variant, resolution=resolution, input_range=input_range, model=model.float())

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the weights in Hugging Face format (atomically), loadable by ``from_pretrained(directory)``."""
        with atomic_write(directory) as tmp:
            self.model.save_pretrained(tmp)
        return Path(directory)

    # -- frozen, eval-only -----------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> DINOv2Encoder:
        # A frozen feature target: dropout/drop-path must never switch on, whatever the parent module does.
        return super().train(False)

    # -- geometry ------------------------------------------------------------------------------------------------

    def grid_size(self, resolution: int | None = None) -> tuple[int, int]:
        return grid_size(self.resolution if resolution is None else resolution, self.patch_size)

    def num_patches(self, resolution: int | None = None) -> int:
        h, w = self.grid_size(resolution)
        return h * w

    # -- forward -------------------------------------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Input range -> [0, 1] -> bicubic (antialiased) resize to ``resolution`` -> ImageNet normalisation."""
        self._check_images(images)
        self._check_range(images)
        x = images
        if self.input_range == "-1_1":
            x = (x + 1.0) / 2.0
        if tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            x = F.interpolate(
                x,
                size=(self.resolution, self.resolution),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            )
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"DINOv2Encoder expects images of shape [B, 3, H, W], got {shape}")
        if images.shape[1] != 3:
            raise ValueError(
                f"DINOv2Encoder expects 3 RGB channels, got {images.shape[1]} (shape {tuple(images.shape)})"
            )

    def _check_range(self, images: torch.Tensor) -> None:
        if not images.is_floating_point():
            raise ValueError(
                f"DINOv2Encoder expects float images in the range {self.input_range}, got dtype {images.dtype}"
            )
        if torch.compiler.is_compiling():
            return
        # Catch a wrong range (0..255 pixels, [-1, 1] fed as [0, 1]) before it silently yields garbage features;
        # the margin leaves room for bicubic overshoot and augmentation.
        low, high = (-1.0, 1.0) if self.input_range == "-1_1" else (0.0, 1.0)
        lo, hi = torch.aminmax(images.detach())
        if lo.item() < low - 0.5 or hi.item() > high + 0.5:
            raise ValueError(
                f"images have values in [{lo.item():.3g}, {hi.item():.3g}], which does not look like the stated "
                f"input_range {self.input_range!r} (expected about [{low:g}, {high:g}])"
            )

    def _check_layers(self, layers: int | list[int] | tuple[int, ...] | None) -> list[int]:
        if layers is None:
            return []
        layers = [layers] if isinstance(layers, int) else list(layers)
        for index in layers:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.depth:
                raise ValueError(
                    f"layer index {index!r} is out of range for DINOv2 {self.variant}: valid 0-based block indices "
                    f"are 0..{self.depth - 1}"
                )
        return layers

    def _interpolate_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Official ``DinoVisionTransformer.interpolate_pos_encoding``.

        Plain models use ``scale_factor=(g + 0.1) / M`` without antialias, register models ``size=g`` with
        antialias (both in float32). transformers' ``Dinov2Model`` passes ``size=g`` (no offset), which shifts the
        sampling grid slightly; we follow the official code because the published features (REPA etc.) came from it.
        """
        pos = self.model.embeddings.position_embeddings
        num_positions = pos.shape[1] - 1
        if grid_h * grid_w == num_positions and grid_h == grid_w:
            return pos
        side = math.isqrt(num_positions)
        patch_pos = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        offset = self.spec.interpolate_offset
        if offset:
            kwargs = {"scale_factor": ((grid_h + offset) / side, (grid_w + offset) / side)}
        else:
            kwargs = {"size": (grid_h, grid_w)}
        patch_pos = F.interpolate(
            patch_pos,
            mode="bicubic",
            align_corners=False,
            antialias=self.spec.interpolate_antialias,
            **kwargs,
        )
        assert patch_pos.shape[-2:] == (grid_h, grid_w), patch_pos.shape
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([pos[:, :1].float(), patch_pos], dim=1).to(pos.dtype)

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Official ``prepare_tokens_with_masks``: [CLS, (registers), patches] with positional embeddings."""
        embeddings = self.model.embeddings
        batch = pixels.shape[0]
        grid_h, grid_w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        tokens = embeddings.patch_embeddings(pixels)
        tokens = torch.cat([embeddings.cls_token.expand(batch, -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self._interpolate_pos_embed(grid_h, grid_w).to(tokens.dtype)
        if self.num_register_tokens:
            registers = embeddings.register_tokens.expand(batch, -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        return tokens

    def forward(
        self,
        images: torch.Tensor,
        layers: int | list[int] | tuple[int, ...] | None = None,
        return_cls: bool = False,
        return_patch_tokens: bool = True,
        preprocess: bool = True,
    ) -> DINOv2Output:
        """Features of ``images`` ([B, 3, H, W] in ``input_range``).

        ``layers``: 0-based block indices whose (un-normalised) patch tokens go to ``out.intermediate``.
        Blocks after the deepest requested output are skipped: with ``return_patch_tokens=False`` and
        ``return_cls=False`` only blocks ``0..max(layers)`` run. ``preprocess=False`` takes already normalised
        pixels whose sides are multiples of 14.
        """
        layers = self._check_layers(layers)
        need_final = return_patch_tokens or return_cls
        if not need_final and not layers:
            raise ValueError("nothing requested: pass layers=[...] or return_patch_tokens/return_cls=True")
        if preprocess:
            pixels = self.preprocess(images)
        else:
            self._check_images(images)
            for side in images.shape[-2:]:
                grid_size(int(side), self.patch_size)
            pixels = images
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        first_patch = 1 + self.num_register_tokens
        num_blocks = self.depth if need_final else max(layers) + 1
        wanted = set(layers)

        hidden = self._embed(pixels)
        intermediate: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.model.encoder.layer[:num_blocks]):
            hidden = block(hidden)
            if index in wanted:
                intermediate[index] = hidden[:, first_patch:]

        patch_tokens = cls_token = None
        if need_final:
            normed = self.model.layernorm(hidden)
            patch_tokens = normed[:, first_patch:] if return_patch_tokens else None
            cls_token = normed[:, 0] if return_cls else None
        return DINOv2Output(
            patch_tokens=patch_tokens,
            cls=cls_token,
            intermediate={k: intermediate[k] for k in sorted(intermediate)},
            grid=grid,
        )

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant}, resolution={self.resolution}, grid={self.grid_size()}, "
            f"input_range={self.input_range}"
        )
