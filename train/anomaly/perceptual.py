"""The DINOv2 perceptual term as both trainers use it: x0 from the model output -> decode -> DINOv2 loss.

Three implementations (``--dinov2_loss_impl``):

* ``fast`` (default): decode the whole x0 and compare it with the whole training image (target features cached
  per image and flip), DINO at 224 px. By default on a random half of the samples, each weighted 2
  (``--dinov2_sample_fraction 0.5``): the expected loss and gradient are those of every sample, at half the
  decode cost on average (the decode with gradient is ~98 % of the term at 512 px).
* ``crop``: decode a random latent tile of x0 (``--dinov2_crop_size`` image px, 256 = a 32x32 tile of a 64x64
  SD latent) and compare it with the same tile of the training image (``losses/latent_crops.py``), DINO at the
  same pixels per token as the full image (112 px for 256 of 512). Cheaper
  still and deterministic, but not the same loss: the SD decoder's GroupNorm and mid-block attention see the
  whole latent, so a decoded tile is not the tile of the decoded image.
* ``reference``: the seed trainer's term, exactly: x0 and the *target latent* both divided by the VAE scaling
  factor, clamped to +-10 and decoded (the target without gradient), no pixel clamp, bilinear resize to
  ``--dinov2_resolution`` (518 by default for this implementation), ImageNet normalisation, L2-normalised
  patch tokens of the requested blocks, distance averaged over the batch, layers summed, every sample.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from losses.dinov2_perceptual import DINOv2PerceptualLoss, DINOv2TargetCache, decode_latents, predicted_x0
from losses.latent_crops import crop_boxes, sample_crop_boxes
from train.core.perf import compile_module
from utils.logging import get_logger

logger = get_logger(__name__)

DINOV2_LOSS_IMPLS = ("fast", "crop", "reference")
DEFAULT_LOSS_IMPL = "fast"
DEFAULT_CROP_SIZE = 256  # image px: a 32x32 tile of SD's 64x64 latent at 512 px
REFERENCE_LATENT_CLAMP = 10.0  # the seed trainer clamps latent / scaling_factor to +-10 before decoding
# --dinov2_resolution when not given: the seed decodes and compares at 518 px; ours at 224 (256 tokens); crops
# at the size that keeps the whole image's pixels per token at 224 (default_dino_resolution).
DEFAULT_DINO_RESOLUTION = {"crop": 224, "fast": 224, "reference": 518}
# --dinov2_sample_fraction when not given.
# fast: a random half of the samples, weighted 2 (same expected loss and gradient, half the cost on average).
DEFAULT_SAMPLE_FRACTION = {"crop": 1.0, "fast": 0.5, "reference": 1.0}


def default_dino_resolution(impl: str, crop_size: int, image_size: int) -> int:
    """DINO input side when ``--dinov2_resolution`` is not given: 224 (fast), 518 (reference, the seed's); for
    crop ``224 * crop / image`` rounded to a multiple of 14 (112 for a 256 px crop of 512 px), so a DINO token
    covers as many image pixels as in the full-image term (measured closer to it than 224, see the docs)."""
    if impl == "crop" and 0 < crop_size < image_size:
        return max(14, round(DEFAULT_DINO_RESOLUTION["fast"] * crop_size / image_size / 14) * 14)
    return DEFAULT_DINO_RESOLUTION[impl]


def vae_scale_factor(latents: torch.Tensor, images: torch.Tensor) -> int:
    """Image px per latent px, from the shapes (8 for SD); a clear error when they do not fit."""
    h, w = latents.shape[-2:]
    factor = images.shape[-1] // w
    if factor < 1 or images.shape[-2] != h * factor or images.shape[-1] != w * factor:
        raise ValueError(
            f"target images {tuple(images.shape[-2:])} are not an integer multiple of the latents {(h, w)}: "
            "the DINOv2 crop needs the images the latents were encoded from"
        )
    return factor


class PerceptualTerm:
    """Callable computing the (unweighted) DINOv2 loss for one branch of a training step.

    The loss is a per-sample mean over the samples with ``t < max_timestep`` (all when None), divided by the
    batch size, so each sample's weight does not depend on how many others qualify (with all samples kept this
    is the batch mean the seed computes); with ``sample_fraction`` p < 1 a random share p of them, weighted 1/p.

    Args:
        impl: "crop", "fast" or "reference" (module docstring). "reference" needs a loss built with
            ``resize="bilinear"`` and the target latents at call time; it ignores ``cache``.
        crop_size: crop side in image pixels for "crop" (a multiple of the VAE factor); a crop at least as
            large as the image is the full image, i.e. "fast".
        sample_fraction: p in (0, 1]: each qualifying sample enters the term with probability p (a uniform
            subset of floor(n p) or ceil(n p) of the n qualifying samples, drawn from ``generator``) and its loss
            is weighted 1/p, so the expected loss and gradient equal those of the term on every sample, at p
            times the cost on average. 1 (all samples) for "reference".
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
        impl: str = DEFAULT_LOSS_IMPL,
        crop_size: int = DEFAULT_CROP_SIZE,
        sample_fraction: float = 1.0,
    ):
        if decoder is None and latent_head is None:
            raise ValueError("PerceptualTerm needs a decoder (VAE) or a latent head")
        if impl not in DINOV2_LOSS_IMPLS:
            raise ValueError(f"--dinov2_loss_impl must be one of {DINOV2_LOSS_IMPLS}, got {impl!r}")
        if impl == "reference":
            if latent_head is not None:
                raise ValueError(
                    "--dinov2_loss_impl reference decodes through the VAE like the seed; drop --dinov2_latent_head"
                )
            if loss.resize != "bilinear":
                raise ValueError(
                    "--dinov2_loss_impl reference needs the seed's bilinear resize (resize='bilinear')"
                )
        if crop_size <= 0:
            raise ValueError(f"--dinov2_crop_size must be positive, got {crop_size}")
        if not 0.0 < sample_fraction <= 1.0:
            raise ValueError(f"--dinov2_sample_fraction must be in (0, 1], got {sample_fraction}")
        if impl == "reference" and sample_fraction != 1.0:
            raise ValueError(
                "--dinov2_loss_impl reference uses every sample, like the seed: --dinov2_sample_fraction 1"
            )
        self.loss = loss
        self.decoder = decoder
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = prediction_type
        self.max_timestep = max_timestep
        self.cache = cache if impl != "reference" else None
        self.latent_head = latent_head
        self.impl = impl
        self.crop_size = int(crop_size)
        self.sample_fraction = float(sample_fraction)

    def targets(
        self,
        images: torch.Tensor,
        indices: Sequence[int],
        flips: Sequence[int],
        regions: Sequence[tuple[int, ...]] | None = None,
    ) -> dict[int, torch.Tensor]:
        if self.latent_head is not None:
            raise RuntimeError("latent-head targets come from latents")
        if self.cache is not None:
            return self.cache.get(images, indices, flips, regions)
        return self.loss.target_features(images)

    def _latent_features(self, latents: torch.Tensor) -> dict[int, torch.Tensor]:
        out = self.latent_head(latents.float(), layers=self.loss.layers, return_patch_tokens=False)
        return {k: F.normalize(v.float(), dim=-1) for k, v in out.intermediate.items()}

    def subsample(self, sel: list[int], generator: torch.Generator | None) -> list[int]:
        """A uniform subset of ``sel`` in which every element has probability ``sample_fraction``."""
        if self.sample_fraction >= 1.0 or not sel:
            return sel
        expected = len(sel) * self.sample_fraction
        k = int(expected)
        if torch.rand((), generator=generator).item() < expected - k:
            k += 1
        picked = torch.randperm(len(sel), generator=generator)[:k].sort().values.tolist()
        return [sel[j] for j in picked]

    def crop_boxes_for(
        self, x0: torch.Tensor, target_images: torch.Tensor, generator: torch.Generator | None
    ) -> list[tuple[int, int, int, int]] | None:
        """One latent box per sample for "crop" (None: the whole image)."""
        if self.impl != "crop":
            return None
        factor = vae_scale_factor(x0, target_images)
        if self.crop_size % factor:
            raise ValueError(
                f"--dinov2_crop_size {self.crop_size} must be a multiple of the VAE factor {factor}"
            )
        side = self.crop_size // factor
        h, w = x0.shape[-2:]
        if side >= h and side >= w:
            return None
        return sample_crop_boxes(x0.shape[0], h, w, side, generator)

    def __call__(
        self,
        model_pred: torch.Tensor,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        target_images: torch.Tensor,
        indices: Sequence[int],
        flips: Sequence[int],
        target_latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, logs). ``generator`` draws the crops (the trainers pass the step's generator, so a resumed run
        draws the same crops); ``target_latents`` are needed by the latent head and by "reference"."""
        b = model_pred.shape[0]
        keep = (
            torch.ones(b, dtype=torch.bool)
            if self.max_timestep is None
            else (timesteps.cpu() < self.max_timestep)
        )
        sel = self.subsample(keep.nonzero().flatten().tolist(), generator)
        logs = {"dinov2_fraction": len(sel) / b}  # the share of the batch the term is computed on
        if not sel:
            return model_pred.new_zeros(()).float(), logs
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
        elif self.impl == "reference":
            if target_latents is None:
                raise ValueError(
                    "--dinov2_loss_impl reference decodes the target latents: pass target_latents"
                )
            images = decode_latents(self.decoder, x0, clamp_latents=REFERENCE_LATENT_CLAMP)
            with torch.no_grad():
                target = decode_latents(
                    self.decoder,
                    target_latents.index_select(0, idx.to(target_latents.device)),
                    clamp_latents=REFERENCE_LATENT_CLAMP,
                )
            per, per_layer = self.loss(images.float(), target.float())
        else:
            target_images = target_images.index_select(0, idx.to(target_images.device))
            boxes = self.crop_boxes_for(x0, target_images, generator)
            if boxes is not None:
                factor = vae_scale_factor(x0, target_images)
                x0 = crop_boxes(x0, boxes)
                target_images = crop_boxes(target_images, boxes, scale=factor)
            images = decode_latents(self.decoder, x0).float().clamp(-1.0, 1.0)
            target = self.targets(
                target_images, [indices[j] for j in sel], [flips[j] for j in sel], regions=boxes
            )
            per, per_layer = self.loss(images, target)
        total = per.sum() / (b * self.sample_fraction)
        for layer, d in per_layer.items():
            if not d.is_meta:  # meta tensors (FLOP and memory counts in the benchmark) carry no values
                logs[f"dinov2_layer{layer}"] = d.detach().mean()  # a tensor: no host sync per step
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

    impl = args.dinov2_loss_impl
    resolution = args.dinov2_resolution or default_dino_resolution(
        impl, args.dinov2_crop_size, args.resolution
    )
    fraction = args.dinov2_sample_fraction or DEFAULT_SAMPLE_FRACTION[impl]
    if impl == "reference" and (args.dinov2_tiny_vae or args.dinov2_latent_head):
        raise ValueError(
            "--dinov2_loss_impl reference is the seed's term through the SD VAE: drop --dinov2_tiny_vae / "
            "--dinov2_latent_head, or choose --dinov2_loss_impl crop|fast"
        )
    encoder = DINOv2Encoder.from_pretrained(
        args.dinov2_weights,
        variant=args.dinov2_model_name,
        resolution=resolution,
        input_range="-1_1",
    ).to(device)
    encoder = compile_module(encoder, args, "dinov2")  # --compile dinov2 (train/core/perf.py)
    loss = DINOv2PerceptualLoss(
        encoder,
        layers=args.dinov2_feature_layers,
        loss_type=args.dinov2_loss_type,
        layer_reduction=args.dinov2_layer_reduction,
        resize="bilinear" if impl == "reference" else "bicubic_antialias",
    )
    latent_head = None
    decoder: nn.Module | None = vae
    if args.dinov2_latent_head:
        latent_head = _load_latent_head(args.dinov2_latent_head, encoder, device)
        decoder = None
    elif args.dinov2_tiny_vae:
        decoder = load_tiny_vae(args.dinov2_tiny_vae).to(device)
    if decoder is not None and args.dinov2_vae_checkpointing:
        decoder.enable_gradient_checkpointing()
    use_cache = cache_targets and args.dinov2_target_cache == "memory" and impl != "reference"
    cache = DINOv2TargetCache(loss) if use_cache else None
    logger.info(
        "DINOv2 loss: %s (%s%s, sample fraction %g) at %d px, layers %s (%s, %s), decoder=%s, "
        "max_timestep=%s, target cache=%s",
        args.dinov2_model_name,
        impl,
        f", {args.dinov2_crop_size} px crops" if impl == "crop" else "",
        fraction,
        resolution,
        loss.layers,
        args.dinov2_loss_type,
        args.dinov2_layer_reduction,
        "latent head" if latent_head is not None else type(decoder).__name__,
        args.dinov2_max_timestep,
        "memory" if cache is not None else "none",
    )
    return PerceptualTerm(
        loss=loss,
        decoder=decoder,
        alphas_cumprod=noise_scheduler.alphas_cumprod.to(device),
        prediction_type=noise_scheduler.config.prediction_type,
        max_timestep=args.dinov2_max_timestep,
        cache=cache,
        latent_head=latent_head,
        impl=impl,
        crop_size=args.dinov2_crop_size,
        sample_fraction=fraction,
    )


def _load_latent_head(path: str, encoder: nn.Module, device: torch.device) -> nn.Module:
    """``LatentDINOv2`` (models/latent_dino_head.py): the frozen DINOv2 with a trained latent patch head."""
    from models.latent_dino_head import LatentDINOv2

    head = LatentDINOv2.from_head_file(encoder, path).to(device)
    head.requires_grad_(False).eval()
    return head
