"""DINOv2 perceptual loss for diffusion fine-tuning (DreamBooth-LoRA stage 1 and the stage-2 dual model).

    x0_hat = predicted_x0(model_output, noisy_latents, t, scheduler)    # epsilon / v / sample prediction
    image  = decode_latents(vae, x0_hat)                                 # with gradient, [-1, 1]
    loss   = sum_l w_l * D(normalize(f_l(image)), normalize(f_l(target)))

``f_l`` = patch tokens after 0-based DINOv2 block ``l``, L2-normalised per token; ``D`` = l1 / l2 (MSE) /
smooth_l1 averaged over tokens and channels; ``w_l`` = 1 (``layer_reduction="sum"``, the seed trainer's
reduction) or 1 / #layers (``"mean"``) unless given.

Which pixels are compared (the full image, a random crop, the seed's decoded target) is decided by the trainer's
term (``train/anomaly/perceptual.py``); this module holds the pieces.

What makes it cheap (vs. decoding prediction *and* target, DINO at 518 px, all blocks, every step):

* the target features come from the training image itself (the pixels the latent was encoded from), never
  from a VAE decode of the target latent; :class:`DINOv2TargetCache` keeps them per (image, flip), so each
  is computed once per run (few-shot sets have tens to hundreds of images);
* only DINO blocks up to the deepest requested layer run (``DINOv2Encoder`` stops there);
* DINO runs at ``resolution`` (224 by default: 256 tokens instead of 1369 at 518);
* optional: only for timesteps below a threshold (decode skipped when no sample qualifies), VAE decoder
  gradient checkpointing, a tiny decoder (``AutoencoderTiny``) used for the loss only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LOSS_TYPES = ("l1", "l2", "smooth_l1")
LAYER_REDUCTIONS = ("sum", "mean")
# How images reach the DINO resolution: our adapter's antialiased bicubic resize, or the seed trainer's plain
# bilinear F.interpolate (align_corners=False, no antialias).
RESIZE_MODES = ("bicubic_antialias", "bilinear")
DINOV2_LOSS_VARIANTS = ("vits14", "vitb14", "vitl14", "vitg14")
DEFAULT_FEATURE_LAYERS = (3, 6, 9, 11)


def _gather(values: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
    out = values.to(device=timesteps.device)[timesteps.long()].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


def predicted_x0(
    model_output: torch.Tensor,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The clean latent implied by the model output, with x_t = sqrt(a) x0 + sqrt(1-a) eps (a = alpha-bar_t).

    epsilon:      x0 = (x_t - sqrt(1-a) eps) / sqrt(a)
    v_prediction: x0 = sqrt(a) x_t - sqrt(1-a) v        (v = sqrt(a) eps - sqrt(1-a) x0)
    sample:       x0 = model_output
    Computed in float32 (1/sqrt(a) reaches ~15 at t=999 for SD's schedule).
    """
    if prediction_type == "sample":
        return model_output
    a = _gather(alphas_cumprod, timesteps, model_output.ndim)
    sqrt_a, sqrt_1ma = a.sqrt(), (1.0 - a).sqrt()
    out, xt = model_output.float(), noisy_latents.float()
    if prediction_type == "epsilon":
        x0 = (xt - sqrt_1ma * out) / sqrt_a
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * xt - sqrt_1ma * out
    else:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample"
        )
    return x0.to(model_output.dtype)


def decode_latents(vae: nn.Module, latents: torch.Tensor, clamp_latents: float | None = None) -> torch.Tensor:
    """Scaled latents -> images (about [-1, 1]) through ``vae`` (AutoencoderKL or AutoencoderTiny), with gradient.

    Both are called the diffusers way, ``vae.decode(latents / scaling_factor)``: AutoencoderKL's SD factor is
    0.18215, AutoencoderTiny's (TAESD) is 1.0 because it decodes the SD-scaled latents directly.
    ``clamp_latents``: clamp the unscaled latents to +-value before decoding (the seed trainer uses 10: an x0
    estimate at large t is (x_t - sqrt(1-a) eps) / sqrt(a), up to ~15x the latent scale). Applied before the
    shift factor (0 for SD).
    """
    scaling = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = latents.to(next(vae.parameters()).dtype) / scaling
    if clamp_latents is not None:
        latents = latents.clamp(-clamp_latents, clamp_latents)
    return vae.decode(latents + shift).sample


class DINOv2PerceptualLoss(nn.Module):
    """Feature distance between images under a frozen :class:`models.dinov2_encoder.DINOv2Encoder`.

    Args:
        encoder: the DINOv2 adapter (its ``resolution`` is the DINO input resolution; its input range must
            be "-1_1", the range of decoded images).
        layers: 0-based block indices (checked against the encoder depth).
        loss_type: "l1", "l2" (MSE) or "smooth_l1" (beta 1).
        layer_reduction: "sum" (each layer weight 1, the seed trainer) or "mean" (1/len(layers) each); ignored
            when ``layer_weights`` is given.
        layer_weights: one weight per layer.
        resize: "bicubic_antialias" (the adapter's own preprocessing) or "bilinear" (the seed trainer's:
            ``F.interpolate(bilinear, align_corners=False)`` only when the size differs, no range check).
    """

    def __init__(
        self,
        encoder: nn.Module,
        layers: Sequence[int] = DEFAULT_FEATURE_LAYERS,
        loss_type: str = "l2",
        layer_weights: Sequence[float] | None = None,
        layer_reduction: str = "sum",
        resize: str = "bicubic_antialias",
    ):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"dinov2 loss type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if layer_reduction not in LAYER_REDUCTIONS:
            raise ValueError(
                f"--dinov2_layer_reduction must be one of {LAYER_REDUCTIONS}, got {layer_reduction!r}"
            )
        if resize not in RESIZE_MODES:
            raise ValueError(f"dinov2 resize must be one of {RESIZE_MODES}, got {resize!r}")
        layers = [int(x) for x in layers]
        if not layers:
            raise ValueError("dinov2 feature layers: give at least one block index")
        if len(set(layers)) != len(layers):
            raise ValueError(f"dinov2 feature layers contain duplicates: {layers}")
        depth = int(encoder.depth)
        bad = [x for x in layers if not 0 <= x < depth]
        if bad:
            raise ValueError(
                f"--dinov2_feature_layers {bad} out of range for DINOv2 {getattr(encoder, 'variant', '')} "
                f"with {depth} blocks: valid 0-based indices are 0..{depth - 1}"
            )
        if getattr(encoder, "input_range", "-1_1") != "-1_1":
            raise ValueError("DINOv2PerceptualLoss needs an encoder with input_range='-1_1' (decoded images)")
        if layer_weights is None:
            w = 1.0 if layer_reduction == "sum" else 1.0 / len(layers)
            layer_weights = [w] * len(layers)
        if len(layer_weights) != len(layers):
            raise ValueError(f"{len(layer_weights)} layer weights for {len(layers)} layers")
        self.encoder = encoder
        self.layers = sorted(layers)
        self.weights = dict(zip(layers, [float(w) for w in layer_weights]))
        self.loss_type = loss_type
        self.layer_reduction = layer_reduction
        self.resize = resize

    def _bilinear_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The seed trainer's preprocessing: [-1, 1] -> [0, 1] -> bilinear resize -> ImageNet normalisation."""
        x = (images + 1.0) / 2.0
        side = int(self.encoder.resolution)
        if tuple(x.shape[-2:]) != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        mean, std = self.encoder.mean.to(x.dtype), self.encoder.std.to(x.dtype)
        return (x - mean) / std

    def features(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """{layer: [B, N, D] L2-normalised patch tokens} (only blocks up to max(layers) run)."""
        if self.resize == "bilinear":
            out = self.encoder(
                self._bilinear_pixels(images),
                layers=self.layers,
                return_patch_tokens=False,
                return_cls=False,
                preprocess=False,
            )
        else:
            out = self.encoder(images, layers=self.layers, return_patch_tokens=False, return_cls=False)
        return {k: F.normalize(v.float(), dim=-1) for k, v in out.intermediate.items()}

    @torch.no_grad()
    def target_features(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.features(images)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-sample distance [B] between normalised token sets."""
        if self.loss_type == "l1":
            d = (a - b).abs()
        elif self.loss_type == "l2":
            d = (a - b).square()
        else:
            d = F.smooth_l1_loss(a, b, reduction="none", beta=1.0)
        return d.flatten(1).mean(1)

    def forward(
        self, images: torch.Tensor, target: torch.Tensor | dict[int, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(per-sample weighted loss [B], {layer: per-sample loss [B]}). ``target``: images or features."""
        target_feats = self.target_features(target) if isinstance(target, torch.Tensor) else target
        pred_feats = self.features(images)
        per_layer = {}
        total = torch.zeros(images.shape[0], device=images.device)
        for layer in self.layers:
            t = target_feats[layer].to(pred_feats[layer].device, torch.float32)
            if t.shape != pred_feats[layer].shape:
                raise ValueError(
                    f"layer {layer}: target features {tuple(t.shape)} vs prediction {tuple(pred_feats[layer].shape)}"
                )
            d = self.distance(pred_feats[layer], t)
            per_layer[layer] = d
            total = total + self.weights[layer] * d
        return total, per_layer


class DINOv2TargetCache:
    """Target features per (dataset index, flip code[, crop box]), computed from the training image on first use.

    Stored in half precision on ``storage_device`` (CPU by default). Valid for one dataset + one DINO
    configuration; the trainer builds a fresh cache per run (it is cheap to refill: one no-grad DINO forward
    per image and flip).
    """

    def __init__(
        self,
        loss: DINOv2PerceptualLoss,
        storage_device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float16,
    ):
        self.loss = loss
        self.storage_device = torch.device(storage_device)
        self.dtype = dtype
        self._store: dict[tuple[int, ...], dict[int, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @torch.no_grad()
    def get(
        self,
        images: torch.Tensor,
        indices: Sequence[int],
        flips: Sequence[int],
        regions: Sequence[tuple[int, ...]] | None = None,
    ) -> dict[int, torch.Tensor]:
        """{layer: [B, N, D]} target features for ``images`` (already flipped and cropped) keyed by
        (index, flip) or, with ``regions`` (one crop box per sample), by (index, flip, *box)."""
        keys = [(int(i), int(f)) for i, f in zip(indices, flips)]
        if regions is not None:
            if len(regions) != len(keys):
                raise ValueError(f"{len(regions)} crop regions for {len(keys)} samples")
            keys = [k + tuple(int(v) for v in r) for k, r in zip(keys, regions)]
        todo = [j for j, k in enumerate(keys) if k not in self._store]
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        if todo:
            feats = self.loss.target_features(images[todo])
            for pos, j in enumerate(todo):
                self._store[keys[j]] = {
                    layer: f[pos].to(self.storage_device, self.dtype).clone() for layer, f in feats.items()
                }
        device = images.device
        return {
            layer: torch.stack([self._store[k][layer] for k in keys]).to(device, torch.float32)
            for layer in self.loss.layers
        }
