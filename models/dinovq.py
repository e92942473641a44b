"""DinoVQ: a ViT VQ tokenizer whose codes must reconstruct both the pixels and the DINOv2 patch features.

    image [B,3,H,W] in [-1,1]
      -> patch embed (p x p conv) + position embedding -> ViT encoder (``encoder_depth`` blocks)
      -> VectorQuantize (EMA codebook, commitment loss; lucidrains' vector-quantize-pytorch)
      -> z_q [B, N, encoder_embed_dim]
           -> pixel decoder: ViT (``decoder_depth``) -> linear to p*p*3 per token -> unpatchify -> image
           -> DINO decoder: ViT (``dino_decoder_depth``) -> linear to ``dino_dim`` -> predicted DINOv2 tokens

Losses (``compute_loss``):
    dino_loss  = mean over tokens of (1 - cos(pred_token, dino_token))   (tokens of the DINOv2 teacher; when the
                 teacher grid differs from the tokenizer grid the predicted token map is resized bilinearly)
    recon_loss = MSE(reconstruction, image)
    vq_loss    = the quantizer's loss (commitment_weight * ||z_e - sg(z_q)||^2; the codebook itself is EMA)
    perceptual_loss = LPIPS-VGG (``use_perceptual``), gen_adv_loss = PatchGAN generator loss (``use_gan``),
    weighted by the adaptive weight (``disc_adaptive_weight``) times the disc_start factor.

As a tokenizer (docs/dinovq.md, "Export and use"): ``DinoVQModel.from_pretrained(dir)`` /
``model.save_pretrained(dir)`` through ``huggingface_hub.PyTorchModelHubMixin`` (``config.json`` + ``model.safetensors``,
the discriminator and the LPIPS network excluded; loaded strictly, in eval mode); ``encode_code(images)`` ->
``[B, H', W']`` code indices, ``decode_code(codes)`` -> images.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from vector_quantize_pytorch import VectorQuantize

from losses.cosine_token_loss import cosine_token_loss
from losses.patchgan import calculate_adaptive_weight
from models.dinovq_loss import DinoVQLoss
from models.vit_blocks import TokenTransformer, init_vit_weights, unpatchify
from utils.weights import MissingWeightsError

UPDATE_TYPES = ("generator", "discriminator")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Training-only submodules: not part of an exported tokenizer (the discriminator has its own optimizer; the
# LPIPS network is not in the state dict at all).
TRAINING_ONLY_PREFIX = "loss_fn."
# The constructor arguments that only matter for training losses; an export sets them off.
_EXPORT_OFF = {"use_gan": False, "use_perceptual": False}
# Constructor arguments that fix the shapes of the weights: an --init_from tokenizer must agree on these.
ARCHITECTURE_KEYS = (
    "img_size",
    "encoder_embed_dim",
    "codebook_size",
    "patch_size",
    "encoder_depth",
    "decoder_embed_dim",
    "decoder_depth",
    "dino_decoder_depth",
    "num_heads",
    "mlp_ratio",
    "dino_dim",
    "codebook_dim",
    "in_channels",
)


class DinoVQModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="dinovq",
    tags=["image-tokenizer", "vector-quantization"],
):
    def __init__(
        self,
        img_size=(224, 224),
        encoder_embed_dim=768,
        codebook_size=8192,
        dino_loss_weight=1.0,
        recon_loss_weight=1.0,
        vq_loss_weight=1.0,
        use_perceptual=False,
        perceptual_weight=1.0,
        vgg_ckpt_path=None,
        use_gan=False,
        disc_start=10000,
        disc_weight=0.5,
        disc_dim=64,
        disc_num_layers=3,
        disc_adaptive_weight=True,
        *,
        patch_size: int = 14,
        encoder_depth: int = 12,
        decoder_embed_dim: int | None = None,
        decoder_depth: int = 12,
        dino_decoder_depth: int = 4,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        dino_dim: int = 768,
        codebook_dim: int | None = 32,
        commitment_weight: float = 0.25,
        ema_decay: float = 0.99,
        threshold_ema_dead_code: int = 2,
        disc_loss: str = "hinge",
        perceptual_module: nn.Module | None = None,
        in_channels: int = 3,
        gen_loss: str | None = None,
    ):
        super().__init__()
        if isinstance(img_size, int):
            img_size = (img_size, img_size)
        img_size = tuple(int(s) for s in img_size)
        if len(img_size) != 2 or any(s % patch_size for s in img_size):
            raise ValueError(
                f"img_size {img_size} must be (H, W) with both divisible by patch_size {patch_size}"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.in_channels = in_channels
        self.dino_dim = dino_dim
        self.codebook_size = codebook_size
        self.dino_loss_weight = dino_loss_weight
        self.recon_loss_weight = recon_loss_weight
        self.vq_loss_weight = vq_loss_weight
        self.use_perceptual = use_perceptual
        self.perceptual_weight = perceptual_weight
        self.use_gan = use_gan
        dec_dim = decoder_embed_dim or encoder_embed_dim

        self.patch_embed = nn.Conv2d(in_channels, encoder_embed_dim, patch_size, stride=patch_size)
        self.encoder = TokenTransformer(
            self.num_tokens, encoder_embed_dim, encoder_embed_dim, encoder_depth, num_heads, mlp_ratio
        )
        self.quantizer = VectorQuantize(
            dim=encoder_embed_dim,
            codebook_size=codebook_size,
            codebook_dim=codebook_dim if codebook_dim and codebook_dim != encoder_embed_dim else None,
            decay=ema_decay,
            commitment_weight=commitment_weight,
            threshold_ema_dead_code=threshold_ema_dead_code,
        )
        self.pixel_decoder = TokenTransformer(
            self.num_tokens, encoder_embed_dim, dec_dim, decoder_depth, num_heads, mlp_ratio
        )
        self.to_pixels = nn.Linear(dec_dim, patch_size * patch_size * in_channels)
        self.dino_decoder = TokenTransformer(
            self.num_tokens, encoder_embed_dim, dec_dim, dino_decoder_depth, num_heads, mlp_ratio
        )
        self.to_dino = nn.Linear(dec_dim, dino_dim)
        for m in (self.encoder, self.pixel_decoder, self.to_pixels, self.dino_decoder, self.to_dino):
            m.apply(init_vit_weights)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)

        self.loss_fn = DinoVQLoss(
            use_perceptual=use_perceptual,
            perceptual_weight=perceptual_weight,
            perceptual_module=perceptual_module,
            vgg_ckpt_path=vgg_ckpt_path,
            use_gan=use_gan,
            disc_start=disc_start,
            disc_weight=disc_weight,
            disc_dim=disc_dim,
            disc_num_layers=disc_num_layers,
            disc_adaptive_weight=disc_adaptive_weight,
            disc_loss=disc_loss,
            in_channels=in_channels,
            gen_loss=gen_loss,
        )
        # Set by the last generator pass (detached), for logging and for reuse by the discriminator pass.
        self.last_reconstructions: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None
        self.last_adaptive_weight: float | None = None

    # -- parameters -----------------------------------------------------------------------------------------
    def generator_parameters(self) -> list[nn.Parameter]:
        """Encoder, quantizer and decoders; excludes the discriminator (its own optimizer)."""
        disc = set(map(id, self.loss_fn.parameters()))
        return [p for p in self.parameters() if id(p) not in disc]

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the pixel decoder's last layer (where the adaptive GAN weight compares gradients)."""
        return self.to_pixels.weight

    # -- forward pieces -------------------------------------------------------------------------------------
    def _check_images(self, imgs: torch.Tensor) -> None:
        if imgs.ndim != 4 or imgs.shape[1] != self.in_channels or tuple(imgs.shape[-2:]) != self.img_size:
            raise ValueError(
                f"DinoVQModel expects images [B,{self.in_channels},{self.img_size[0]},{self.img_size[1]}] "
                f"in [-1,1], got {tuple(imgs.shape)}"
            )

    def encode(
        self, imgs: torch.Tensor, freeze_codebook: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (z_q [B,N,D], code indices [B,N], quantizer loss)."""
        self._check_images(imgs)
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2)
        z = self.encoder(x)
        z_q, indices, vq_loss = self.quantizer(z, freeze_codebook=freeze_codebook)
        return z_q, indices, vq_loss.mean()

    def decode_pixels(self, z_q: torch.Tensor) -> torch.Tensor:
        return unpatchify(
            self.to_pixels(self.pixel_decoder(z_q)), self.patch_size, self.grid, self.in_channels
        )

    def decode_dino(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.to_dino(self.dino_decoder(z_q))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices [B,N] -> image."""
        return self.decode_pixels(self.quantizer.get_output_from_indices(indices))

    @torch.no_grad()
    def encode_code(self, imgs: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] -> code indices [B, H', W'] (int64), without touching the codebook."""
        _, indices, _ = self.encode(imgs, freeze_codebook=True)
        return indices.view(imgs.shape[0], *self.grid)

    @torch.no_grad()
    def decode_code(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices [B, H', W'] (or [B, N]) of any integer dtype -> images [B,3,H,W] in about [-1,1]
        (LlamaGen's ``VQModel.decode_code``); ``decode_code(encode_code(x))`` is ``reconstruct(x)[0]``."""
        if codes.is_floating_point() or codes.ndim not in (2, 3):
            raise ValueError(
                f"decode_code expects integer codes [B, H', W'] or [B, N], got {codes.dtype} "
                f"{tuple(codes.shape)}"
            )
        flat = codes.reshape(codes.shape[0], -1).long()
        if flat.shape[1] != self.num_tokens or (codes.ndim == 3 and tuple(codes.shape[1:]) != self.grid):
            raise ValueError(f"decode_code: codes {tuple(codes.shape)} do not fit the token grid {self.grid}")
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.codebook_size):
            raise ValueError(
                f"decode_code: code indices must be in [0, {self.codebook_size}), got "
                f"[{int(flat.min())}, {int(flat.max())}]"
            )
        return self.decode_indices(flat)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (reconstruction, indices), without touching the codebook."""
        z_q, indices, _ = self.encode(imgs, freeze_codebook=True)
        return self.decode_pixels(z_q), indices

    def forward(self, imgs, dino_features_gt=None, update_type="generator", global_step=0, **kwargs):
        """Same as ``compute_loss`` (so that DDP-wrapped models go through ``__call__``)."""
        return self.compute_loss(
            imgs, dino_features_gt, update_type=update_type, global_step=global_step, **kwargs
        )

    # -- export -------------------------------------------------------------------------------------------
    def tokenizer_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict of the tokenizer alone (encoder, codebook, decoders): no discriminator."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(TRAINING_ONLY_PREFIX)}

    def export_config(self) -> dict[str, Any]:
        """The constructor arguments of the exported tokenizer: this model's, with the training losses off."""
        cfg = dict(self._hub_mixin_config or {})
        cfg.update(_EXPORT_OFF)
        cfg["img_size"] = list(self.img_size)
        return cfg

    def _save_pretrained(self, save_directory: Path) -> None:
        """``PyTorchModelHubMixin`` hook: ``model.safetensors`` (tokenizer only) and ``config.json``."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tokenizer_state_dict().items()}
        save_file(tensors, str(Path(save_directory) / WEIGHTS_FILE), metadata={"format": "pt"})
        (Path(save_directory) / CONFIG_FILE).write_text(
            json.dumps(self.export_config(), indent=2, sort_keys=True) + "\n"
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *, strict: bool = True, **kwargs: Any
    ) -> DinoVQModel:
        """An exported tokenizer (a local directory with ``config.json`` + ``model.safetensors``) in eval mode.

        Loaded strictly (a missing or unexpected tensor is an error, unlike the mixin's default); nothing is
        downloaded: a missing directory or file raises ``MissingWeightsError`` naming it.
        ``kwargs``: constructor overrides (e.g. ``use_gan=True`` to fine-tune; the discriminator then starts
        fresh, so pass ``strict=False``) and ``map_location``.
        """
        root = Path(pretrained_model_name_or_path).expanduser()
        how = (
            "Export one with `python train/dinovq/export.py OUTPUT_DIR/checkpoint-N --output DIR` (a finished "
            "training run writes OUTPUT_DIR/dinovq/ itself)."
        )
        for path in (root, root / CONFIG_FILE, root / WEIGHTS_FILE):
            if not path.exists():
                raise MissingWeightsError(f"DinoVQ tokenizer not found: {path} does not exist. {how}")
        model = super().from_pretrained(str(root), strict=strict, **kwargs)
        return model.eval()

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
        revision: Any = None,
        cache_dir: Any = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: Any = None,
        **model_kwargs: Any,
    ) -> DinoVQModel:
        """``PyTorchModelHubMixin`` hook: build from the config's arguments, load ``model.safetensors``."""
        from safetensors.torch import load_model

        model = cls(**model_kwargs)
        load_model(model, str(Path(model_id) / WEIGHTS_FILE), strict=strict, device=str(map_location))
        return model.to(map_location).eval()

    # -- losses ---------------------------------------------------------------------------------------------
    def dino_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over tokens of 1 - cosine similarity; resizes ``pred`` to the teacher's token grid if needed."""
        if target.ndim != 3 or target.shape[-1] != self.dino_dim:
            raise ValueError(
                f"dino_features_gt must be [B, N, {self.dino_dim}] (dino_dim), got {tuple(target.shape)}"
            )
        if target.shape[0] != pred.shape[0]:
            raise ValueError(f"batch mismatch: images {pred.shape[0]} vs dino_features_gt {target.shape[0]}")
        if target.shape[1] != pred.shape[1]:
            pred = self._resize_tokens(pred, target.shape[1])
        return cosine_token_loss(pred, target)

    def _resize_tokens(self, pred: torch.Tensor, n_target: int) -> torch.Tensor:
        h, w = self.grid
        gh = round(math.sqrt(n_target * h / w))
        gw = n_target // max(gh, 1)
        if gh * gw != n_target:
            raise ValueError(
                f"dino_features_gt has {n_target} tokens, which is not a grid with the aspect ratio of the "
                f"tokenizer grid {self.grid}; compute the DINO features at a matching resolution."
            )
        x = pred.transpose(1, 2).reshape(pred.shape[0], -1, h, w)
        x = F.interpolate(x, size=(gh, gw), mode="bilinear", align_corners=False)
        return x.flatten(2).transpose(1, 2)

    def compute_loss(
        self,
        imgs: torch.Tensor,
        dino_features_gt: torch.Tensor,
        update_type: str = "generator",
        global_step: int = 0,
        reconstructions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The seed's loss dictionaries (see ``docs/dinovq.md``).

        ``reconstructions`` (discriminator pass only, optional): the generator pass's output to reuse, e.g.
        ``model.last_reconstructions``; otherwise the reconstruction is recomputed without gradients and
        without updating the codebook.
        """
        if update_type not in UPDATE_TYPES:
            raise ValueError(f"update_type must be one of {UPDATE_TYPES}, got {update_type!r}")
        if update_type == "discriminator":
            return self._discriminator_losses(imgs, global_step, reconstructions)
        return self._generator_losses(imgs, dino_features_gt, global_step)

    def _generator_losses(self, imgs, dino_features_gt, global_step):
        if dino_features_gt is None:
            raise ValueError("compute_loss(update_type='generator') needs dino_features_gt [B, N, dino_dim]")
        z_q, indices, vq_loss = self.encode(imgs)
        rec = self.decode_pixels(z_q)
        dino_loss = self.dino_loss(self.decode_dino(z_q), dino_features_gt)
        recon_loss = F.mse_loss(rec.float(), imgs.float())
        self.last_reconstructions, self.last_indices = rec.detach(), indices.detach()

        out = {
            "dino_loss": dino_loss,
            "recon_loss": recon_loss,
            "vq_loss": vq_loss,
            "dino_loss_weighted": dino_loss * self.dino_loss_weight,
            "recon_loss_weighted": recon_loss * self.recon_loss_weight,
            "vq_loss_weighted": vq_loss * self.vq_loss_weight,
        }
        if self.use_perceptual:
            perceptual = self.loss_fn.perceptual_loss(rec, imgs)
            out["perceptual_loss"] = perceptual
            out["perceptual_loss_weighted"] = perceptual * self.perceptual_weight
        if self.use_gan:
            out.update(self._generator_adv(rec, out, global_step))
        weighted = [v for k, v in out.items() if k.endswith("_weighted")]
        out["total_loss"] = torch.stack([v.float() for v in weighted]).sum()
        return {"total_loss": out.pop("total_loss"), **out}

    def _generator_adv(self, rec, out, global_step):
        lf = self.loss_fn
        factor = lf.disc_factor(global_step)
        if factor == 0.0:
            # Warm-up: the adversarial term is exactly zero and contributes no gradient; its value is still
            # reported (computed without a graph) so the curve is visible before disc_start.
            with torch.no_grad():
                g_loss = lf.generator_loss(rec)
            self.last_adaptive_weight = 0.0
            return {"gen_adv_loss": g_loss, "gen_adv_loss_weighted": torch.zeros_like(g_loss)}
        g_loss = lf.generator_loss(rec)
        if lf.disc_adaptive_weight and torch.is_grad_enabled() and self.training:
            rec_side = out["recon_loss_weighted"]
            if "perceptual_loss_weighted" in out:
                rec_side = rec_side + out["perceptual_loss_weighted"]
            d_weight = calculate_adaptive_weight(rec_side, g_loss, self.last_layer, lf.disc_weight)
        else:
            d_weight = torch.tensor(lf.disc_weight, device=g_loss.device)
        self.last_adaptive_weight = float(d_weight)
        return {"gen_adv_loss": g_loss, "gen_adv_loss_weighted": g_loss * d_weight * factor}

    def _discriminator_losses(self, imgs, global_step, reconstructions):
        lf = self.loss_fn
        if not self.use_gan:
            raise ValueError("update_type='discriminator' needs a model built with use_gan=True")
        self._check_images(imgs)
        if reconstructions is None:
            with torch.no_grad():
                z_q, _, _ = self.encode(imgs, freeze_codebook=True)
                reconstructions = self.decode_pixels(z_q)
        factor = lf.disc_factor(global_step)
        d_loss, logits_real, logits_fake = lf.discriminator_loss(imgs, reconstructions)
        return {
            "disc_loss": d_loss * factor,
            "disc_weight": torch.tensor(factor, device=d_loss.device),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
