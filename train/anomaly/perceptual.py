"""The DINOv2 perceptual term as both trainers use it: x0 from the model output -> decode -> DINOv2 loss."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from losses.dinov2_perceptual import DINOv2PerceptualLoss, DINOv2TargetCache, decode_latents, predicted_x0
from train.core.perf import compile_module
from utils.logging import get_logger

logger = get_logger(__name__)


class PerceptualTerm:
    """Callable computing the (unweighted) DINOv2 loss for one branch of a training step.

    The loss is a per-sample mean over the samples with ``t < max_timestep`` (all when None), divided by the
    batch size, so each sample's weight does not depend on how many others qualify.
    """

    def __init__(
        self,
        loss: DINOv2PerceptualLoss,
        decoder: nn.Module | None,
        alphas_cumprod: torch.Tensor,
        prediction_type: str,
        max_timestep: int | None = None,
        cache: DINOv2TargetCache | None = None,
        latent_head: nn.Module | None = None,
    ):
        if decoder is None and latent_head is None:
            raise ValueError("PerceptualTerm needs a decoder (VAE) or a latent head")
        self.loss = loss
        self.decoder = decoder
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = prediction_type
        self.max_timestep = max_timestep
        self.cache = cache
        self.latent_head = latent_head

    def targets(
        self, images: torch.Tensor, indices: Sequence[int], flips: Sequence[int]
    ) -> dict[int, torch.Tensor]:
        if self.latent_head is not None:
            raise RuntimeError("latent-head targets come from latents")
        if self.cache is not None:
            return self.cache.get(images, indices, flips)
        return self.loss.target_features(images)

    def _latent_features(self, latents: torch.Tensor) -> dict[int, torch.Tensor]:
        out = self.latent_head(latents.float(), layers=self.loss.layers, return_patch_tokens=False)
        return {k: F.normalize(v.float(), dim=-1) for k, v in out.intermediate.items()}

    def __call__(
        self,
        model_pred: torch.Tensor,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        target_images: torch.Tensor,
        indices: Sequence[int],
        flips: Sequence[int],
        target_latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        b = model_pred.shape[0]
        keep = (
            torch.ones(b, dtype=torch.bool)
            if self.max_timestep is None
            else (timesteps.cpu() < self.max_timestep)
        )
        logs = {"dinov2_fraction": float(keep.float().mean())}
        if not keep.any():
            return model_pred.new_zeros(()).float(), logs
        sel = keep.nonzero().flatten().tolist()
        idx = torch.tensor(sel, device=model_pred.device)
        x0 = predicted_x0(
            model_pred.index_select(0, idx),
            noisy_latents.index_select(0, idx),
            timesteps.index_select(0, idx),
            self.alphas_cumprod,
            self.prediction_type,
        )
        if self.latent_head is not None:
            pred_feats = self._latent_features(x0)
            with torch.no_grad():
                tgt = self._latent_features(target_latents.index_select(0, idx))
            per = torch.zeros(len(sel), device=model_pred.device)
            per_layer = {}
            for layer in self.loss.layers:
                d = self.loss.distance(pred_feats[layer], tgt[layer])
                per_layer[layer] = d
                per = per + self.loss.weights[layer] * d
        else:
            images = decode_latents(self.decoder, x0).float().clamp(-1.0, 1.0)
            target = self.targets(
                target_images.index_select(0, idx.to(target_images.device)),
                [indices[j] for j in sel],
                [flips[j] for j in sel],
            )
            per, per_layer = self.loss(images, target)
        total = per.sum() / b
        for layer, d in per_layer.items():
            logs[f"dinov2_layer{layer}"] = float(d.detach().mean())
        return total, logs


def build_perceptual_term(
    args: argparse.Namespace,
    vae: nn.Module,
    noise_scheduler,
    device: torch.device,
    cache_targets: bool = True,
) -> PerceptualTerm:
    """Load DINOv2 (and the optional tiny decoder / latent head) per the ``--dinov2_*`` flags."""
    from models.dinov2_encoder import DINOv2Encoder
    from train.anomaly.components import load_tiny_vae

    encoder = DINOv2Encoder.from_pretrained(
        args.dinov2_weights,
        variant=args.dinov2_model_name,
        resolution=args.dinov2_resolution,
        input_range="-1_1",
    ).to(device)
    encoder = compile_module(encoder, args, "dinov2")  # --compile dinov2 (train/core/perf.py)
    loss = DINOv2PerceptualLoss(encoder, layers=args.dinov2_feature_layers, loss_type=args.dinov2_loss_type)
    latent_head = None
    decoder: nn.Module | None = vae
    if args.dinov2_latent_head:
        latent_head = _load_latent_head(args.dinov2_latent_head, encoder, device)
        decoder = None
    elif args.dinov2_tiny_vae:
        decoder = load_tiny_vae(args.dinov2_tiny_vae).to(device)
    if decoder is not None and args.dinov2_vae_checkpointing:
        decoder.enable_gradient_checkpointing()
    cache = DINOv2TargetCache(loss) if (cache_targets and args.dinov2_target_cache == "memory") else None
    logger.info(
        "DINOv2 loss: %s at %d px, layers %s (%s), decoder=%s, max_timestep=%s, target cache=%s",
        args.dinov2_model_name,
        args.dinov2_resolution,
        loss.layers,
        args.dinov2_loss_type,
        "latent head" if latent_head is not None else type(decoder).__name__,
        args.dinov2_max_timestep,
        args.dinov2_target_cache,
    )
    return PerceptualTerm(
        loss=loss,
        decoder=decoder,
        alphas_cumprod=noise_scheduler.alphas_cumprod.to(device),
        prediction_type=noise_scheduler.config.prediction_type,
        max_timestep=args.dinov2_max_timestep,
        cache=cache,
        latent_head=latent_head,
    )


def _load_latent_head(path: str, encoder: nn.Module, device: torch.device) -> nn.Module:
    """``LatentDINOv2`` (models/latent_dino_head.py): the frozen DINOv2 with a trained latent patch head."""
    from models.latent_dino_head import LatentDINOv2

    head = LatentDINOv2.from_head_file(encoder, path).to(device)
    head.requires_grad_(False).eval()
    return head
