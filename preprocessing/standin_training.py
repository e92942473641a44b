"""Training loops of the trained stand-in models (see preprocessing/trained_assets.py for the whole build).

Each function trains one model from scratch on in-memory uint8 images and returns it with its held-out figures.
They are plain single-process loops, not the repo's trainers: those fine-tune (LoRA, frozen bases) or train
their own model families, while these models have to be trained from random weights as their authors did
(the VAE as an autoencoder, SD's U-Net + text encoder as a text-to-image denoiser, DINOv2's ViT as a feature
extractor). Every loop is seeded and single-threaded in its data order, so a rebuild gives the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of images in [-1, 1], computed on the [0, 1] scale."""
    mse = ((reference - estimate) / 2).clamp(-1, 1).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift px (reflect padding): cheap augmentation for the classifiers."""
    if max_shift <= 0:
        return images
    padded = F.pad(images, [max_shift] * 4, mode="reflect")
    out = torch.empty_like(images)
    h, w = images.shape[-2:]
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _loop(
    name: str,
    params: list[torch.nn.Parameter],
    steps: int,
    lr: float,
    step_fn: Callable[[int], torch.Tensor],
    log: list[float],
    weight_decay: float = 0.0,
) -> None:
    # fused: one kernel for all parameters instead of a Python loop over ~300 tensors (~13 % of a U-Net step)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _cosine_lr(s, steps, max(1, steps // 20))
    )
    bar = tqdm(range(steps), desc=name, leave=False, mininterval=2.0)
    for step in bar:
        loss = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        log.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(log[-20:]):.4f}")


def _batches(
    weights: list[float], pools: list[int], batch: int, generator: torch.Generator
) -> list[tuple[int, int]]:
    """(pool, index) pairs for one batch: pool drawn by weight, index uniformly within the pool."""
    which = torch.multinomial(torch.tensor(weights), batch, replacement=True, generator=generator).tolist()
    return [(p, int(torch.randint(0, pools[p], (1,), generator=generator))) for p in which]


def train_vae(
    vae: torch.nn.Module,
    pools: list[torch.Tensor],
    weights: list[float],
    held_out: dict[str, torch.Tensor],
    *,
    steps: int,
    batch: int,
    lr: float,
    kl_weight: float,
    seed: int,
) -> tuple[torch.nn.Module, dict]:
    """AutoencoderKL trained on reconstruction (L1 + MSE) + kl_weight * KL, as SD's first stage without its
    LPIPS/GAN terms; afterwards its scaling_factor is set to 1/std of the training latents (what SD's authors
    did for theirs, 0.18215)."""
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    vae.train()

    def step_fn(step: int) -> torch.Tensor:
        pick = _batches(weights, [len(p) for p in pools], batch, generator)
        x = torch.stack([pools[p][i] for p, i in pick])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * posterior.kl().mean() / x[0].numel()

    _loop("vae", list(vae.parameters()), steps, lr, step_fn, losses)
    vae.eval().requires_grad_(False)
    figures: dict = {"loss_first": float(np.mean(losses[:10])), "loss_last": float(np.mean(losses[-10:]))}
    with torch.no_grad():
        latents = torch.cat([vae.encode(p[:256]).latent_dist.mean for p in pools])
        scaling = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scaling)
        figures["scaling_factor"] = scaling
        for key, images in held_out.items():
            recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in images.split(64)])
            figures[f"psnr_{key}"] = psnr(images, recon)
    return vae, figures


def train_classifier(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_shift: int = 4,
    name: str = "classifier",
) -> dict:
    """Cross-entropy training with random shifts; returns held-out accuracy. forward maps images -> logits."""
    forward = forward or model
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    params = [p for p in model.parameters() if p.requires_grad]

    def step_fn(step: int) -> torch.Tensor:
        index = torch.randint(0, len(images), (batch,), generator=generator)
        x = random_shift(images[index], max_shift, generator)
        return F.cross_entropy(forward(x), labels[index])

    _loop(name, params, steps, lr, step_fn, losses, weight_decay=0.05)
    with torch.no_grad():
        predictions = torch.cat([forward(c).argmax(1) for c in test_images.split(128)])
    return {
        "loss_first": float(np.mean(losses[:10])),
        "loss_last": float(np.mean(losses[-10:])),
        "test_accuracy": float((predictions == test_labels).float().mean()),
    }


def train_text_to_image(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    prompt_ids: torch.Tensor,
    latent_pools: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    weights: list[float],
    noise_scheduler,
    *,
    steps: int,
    batch: int,
    lr: float,
    uncond_prob: float,
    uncond_index: int,
    seed: int,
) -> dict:
    """SD's pretraining objective: epsilon prediction on noised VAE latents, text encoder trained jointly,
    prompts dropped to "" with uncond_prob so classifier-free guidance works.

    latent_pools: per source (posterior mean, posterior std, prompt index) with latents already scaled by the
    VAE's scaling_factor; prompt_ids [P, 77] holds every distinct prompt, so each step encodes P prompts once.
    """
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    unet.train()
    text_encoder.train()
    alphas = noise_scheduler.alphas_cumprod

    def step_fn(step: int) -> torch.Tensor:
        pick = _batches(weights, [len(p[0]) for p in latent_pools], batch, generator)
        mean = torch.stack([latent_pools[p][0][i] for p, i in pick])
        std = torch.stack([latent_pools[p][1][i] for p, i in pick])
        prompt = torch.stack([latent_pools[p][2][i] for p, i in pick])
        drop = torch.rand(batch, generator=generator) < uncond_prob
        prompt = torch.where(drop, torch.full_like(prompt, uncond_index), prompt)
        latents = mean + std * torch.randn(mean.shape, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, len(alphas), (batch,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        states = text_encoder(prompt_ids)[0][prompt]
        return F.mse_loss(unet(noisy, t, states).sample, noise)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    _loop("sd15 unet+text", params, steps, lr, step_fn, losses, weight_decay=0.01)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return {"loss_first": float(np.mean(losses[:20])), "loss_last": float(np.mean(losses[-20:]))}
