"""DINOv2 on Stable Diffusion latents: the patch embedding replaced by a small conv head (seed 002's experiment).

``LatentDINOv2(encoder, head)`` takes SD latents ``[B, 4, H/8, W/8]`` (scaled as the UNet sees them:
``vae.encode(x).latent_dist.mean * vae.config.scaling_factor``) and returns the same ``DINOv2Output`` as
``DINOv2Encoder`` run on the decoded image, so a DINOv2 perceptual loss can compare latents directly, without a
VAE decode. Only the head is trained (``train/latent_dino_head/train.py`` distils it against DINOv2 on the real
images); the transformer blocks, CLS/register tokens, position embeddings and final norm are the frozen
DINOv2 ones.

Geometry: the adapter resizes every image to ``encoder.resolution`` and sees a ``resolution/14`` grid; 14 px are
1.75 latent pixels, so the head works at latent resolution and resamples its feature map to the encoder's grid
(bilinear, antialiased when shrinking) before a 1x1 projection to the embedding width.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.dinov2_encoder import DINOv2Encoder, DINOv2Output


class LatentPatchHead(nn.Module):
    """Conv head: latents [B,C,h,w] -> tokens [B, gh*gw, embed_dim] on the requested grid."""

    def __init__(self, embed_dim: int, latent_channels: int = 4, hidden: int = 256, depth: int = 3):
        super().__init__()
        if depth < 1:
            raise ValueError(f"head depth must be >= 1, got {depth}")
        self.config = {
            "embed_dim": embed_dim,
            "latent_channels": latent_channels,
            "hidden": hidden,
            "depth": depth,
        }
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, hidden, 3, padding=1), nn.GELU()]
        for _ in range(depth - 1):
            layers += [
                nn.Conv2d(hidden, hidden, 3, padding=1),
                nn.GroupNorm(min(32, hidden), hidden),
                nn.GELU(),
            ]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Conv2d(hidden, embed_dim, 1)
        self.latent_channels = latent_channels

    def forward(self, latents: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"latent head expects [B,{self.latent_channels},h,w] latents, got {tuple(latents.shape)}"
            )
        x = self.body(latents)
        if tuple(x.shape[-2:]) != tuple(grid):
            shrink = x.shape[-2] > grid[0] or x.shape[-1] > grid[1]
            x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False, antialias=shrink)
        return self.proj(x).flatten(2).transpose(1, 2)


class LatentDINOv2(nn.Module):
    """A frozen ``DINOv2Encoder`` whose patch embedding is ``head`` (trainable); forward takes SD latents."""

    def __init__(self, encoder: DINOv2Encoder, head: LatentPatchHead):
        super().__init__()
        if head.config["embed_dim"] != encoder.embed_dim:
            raise ValueError(
                f"head embed_dim {head.config['embed_dim']} != DINOv2 {encoder.variant} width {encoder.embed_dim}"
            )
        self.encoder = encoder.requires_grad_(False)
        self.head = head

    @property
    def depth(self) -> int:
        return self.encoder.depth

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def grid_size(self) -> tuple[int, int]:
        return self.encoder.grid_size()

    def _tokens(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        # Same sequence as the adapter's _embed: [CLS, (registers), patches] + position embeddings.
        emb = self.encoder.model.embeddings
        b = patch_tokens.shape[0]
        cls = emb.cls_token.expand(b, -1, -1).to(patch_tokens.dtype)
        tokens = torch.cat([cls, patch_tokens], dim=1)
        tokens = tokens + self.encoder._interpolate_pos_embed(*grid).to(tokens.dtype)
        if self.encoder.num_register_tokens:
            registers = emb.register_tokens.expand(b, -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        return tokens

    def forward(
        self,
        latents: torch.Tensor,
        layers: int | list[int] | tuple[int, ...] | None = None,
        return_cls: bool = False,
        return_patch_tokens: bool = True,
    ) -> DINOv2Output:
        """Same contract as ``DINOv2Encoder.forward`` (``layers`` 0-based, blocks after the last one skipped)."""
        enc = self.encoder
        layers = enc._check_layers(layers)
        need_final = return_patch_tokens or return_cls
        if not need_final and not layers:
            raise ValueError("nothing requested: pass layers=[...] or return_patch_tokens/return_cls=True")
        grid = enc.grid_size()
        hidden = self._tokens(self.head(latents, grid), grid)
        first_patch = 1 + enc.num_register_tokens
        num_blocks = enc.depth if need_final else max(layers) + 1
        wanted = set(layers)
        intermediate: dict[int, torch.Tensor] = {}
        for index, block in enumerate(enc.model.encoder.layer[:num_blocks]):
            hidden = block(hidden)
            if index in wanted:
                intermediate[index] = hidden[:, first_patch:]
        patch_tokens = cls_token = None
        if need_final:
            normed = enc.model.layernorm(hidden)
            patch_tokens = normed[:, first_patch:] if return_patch_tokens else None
            cls_token = normed[:, 0] if return_cls else None
        return DINOv2Output(patch_tokens=patch_tokens, cls=cls_token, intermediate=intermediate, grid=grid)

    # -- head weights ----------------------------------------------------------------------------------------
    def save_head(self, path: str | os.PathLike) -> Path:
        """safetensors with the head config, DINOv2 variant and resolution in the metadata."""
        from utils.checkpoint import save_safetensors_atomic

        meta = {k: str(v) for k, v in self.head.config.items()}
        meta.update({"variant": self.encoder.variant, "resolution": str(self.encoder.resolution)})
        return save_safetensors_atomic(self.head.state_dict(), path, metadata=meta)

    @classmethod
    def from_head_file(cls, encoder: DINOv2Encoder, path: str | os.PathLike) -> LatentDINOv2:
        """Attach a trained head; its variant/resolution must match ``encoder``."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        from utils.weights import require_file

        path = require_file(
            path,
            "latent DINOv2 head",
            "Train one with `python train/latent_dino_head/train.py` (see docs/global_perc_loss.md).",
        )
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        for key in ("embed_dim", "latent_channels", "hidden", "depth", "variant", "resolution"):
            if key not in meta:
                raise ValueError(f"{path} is not a latent DINOv2 head file (metadata lacks {key!r})")
        if meta["variant"] != encoder.variant or int(meta["resolution"]) != encoder.resolution:
            raise ValueError(
                f"{path} was trained for DINOv2 {meta['variant']} at {meta['resolution']} px, "
                f"but the encoder is {encoder.variant} at {encoder.resolution} px"
            )
        head = LatentPatchHead(
            embed_dim=int(meta["embed_dim"]),
            latent_channels=int(meta["latent_channels"]),
            hidden=int(meta["hidden"]),
            depth=int(meta["depth"]),
        )
        head.load_state_dict(load_file(str(path)), strict=True)
        return cls(encoder, head.requires_grad_(False).eval())
