"""Cost of the DINOv2 perceptual term at SD-1.5 sizes: FLOPs, peak memory, time, and what the crop changes.

    .env/bin/python script/bench/bench_dinov2_loss.py --resolution 512 --rounds 3            # all sections
    .env/bin/python script/bench/bench_dinov2_loss.py --resolution 512 --sections agreement  # vs the full image
    .env/bin/python script/bench/bench_dinov2_loss.py --tiny                                 # on the tiny assets

Models (random weights, nothing to download): SD-1.5's U-Net with the trainers' LoRA (rank 32 on to_q/k/v/out.0)
and SD-1.5's VAE, both from the values of stable-diffusion-v1-5/stable-diffusion-v1-5 unet/ and vae/config.json;
DINOv2 ViT-B/14 (layers 3 6 9 11, l2, layers summed); TAESD = diffusers AutoencoderTiny defaults (madebyollin/taesd).
Each variant is the repo's own ``PerceptualTerm`` (train/anomaly/perceptual.py) with its flags.

The overhead of a variant is what the term adds to a training step: its forward (x0 -> decode -> DINOv2) and its
backward down to the U-Net output. The rest of the step is the same with or without the term (autograd adds the
MSE and DINOv2 gradients at the U-Net output and runs the U-Net backward once), so the term is timed on its own,
which avoids subtracting two noisy step times. Sections:

flops      FLOPs per sample of the term (forward + backward to the U-Net output; batch 2 / 2, so a sample
           fraction of 0.5 draws exactly one) and of the U-Net LoRA step for scale:
           torch.utils.flop_counter.FlopCounterMode (matmul, conv, attention) on the meta device.
memory     peak live tensor bytes (utils.memory.LiveTensorPeak, meta device: no compute) of the term alone and of
           a whole step (U-Net forward + MSE + term + backward), batch 1 and the seed's batch (8); frozen weights
           and the optimizer state are not included (the same for every variant).
time       the --time variants in ONE process on the CPU, interleaved: each round runs every variant once (order
           rotated per round), after one untimed warm-up call each (--warmup 0: none); target caches warm. Per
           variant: median and min-max seconds; per round the ratio to the reference term; peak RSS above the
           call's start. A variant with sample fraction p < 1 is reported as p x its p = 1 counterpart's time
           per round (a step decodes a drawn sample or skips the term).
agreement  a variant against the full-image term on every sample (fast): the exact expectation over every random
           outcome of the variant (all crop tiles; all sample subsets, with their probabilities) vs the full
           value (relative error) and gradient w.r.t. the U-Net output (cosine, norm ratio), and single draws.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import contextlib
import gc
import itertools
import os
import statistics
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from losses.dinov2_perceptual import DINOv2PerceptualLoss, DINOv2TargetCache
from losses.latent_crops import crop_boxes, crop_tiles
from train.anomaly.perceptual import PerceptualTerm, default_dino_resolution
from utils.memory import LiveTensorPeak, PeakRSS

LAYERS = [3, 6, 9, 11]
SEED_BATCH = 8  # the seed's stage-1 --train_batch_size (stage 2: 4 pairs = 8 U-Net samples, 4 in the term)
SECTIONS = ("flops", "memory", "time", "agreement")


@dataclass(frozen=True)
class Variant:
    impl: str
    what: str
    crop: int = 256
    resolution: int | None = None
    decoder: str = "sd"  # sd | taesd | latent_head
    checkpointing: bool = False
    bf16: bool = False
    fraction: float = 1.0  # --dinov2_sample_fraction


VARIANTS = {
    "reference": Variant("reference", "the seed's term: decode x0 and the target latent, DINO 518 px"),
    "fast": Variant("fast", "whole x0 decoded, target = cached training image, DINO 224, every sample"),
    "fast_p05": Variant("fast", "DEFAULT: fast on a random half of the samples, weighted 2", fraction=0.5),
    "crop": Variant(
        "crop", "256 px tile of x0 (32x32 latent) vs the same image tile, DINO 112 = 224 x 256/512"
    ),
    "crop_dino224": Variant(
        "crop", "crop with DINO at 224 px (twice the full image's tokens per pixel)", resolution=224
    ),
    "crop384": Variant("crop", "384 px tile (48x48 latent), DINO 168", crop=384),
    "fast_dino112": Variant("fast", "fast with DINO at 112 px", resolution=112),
    "fast_ckpt": Variant("fast", "fast + VAE-decoder gradient checkpointing", checkpointing=True),
    "fast_bf16": Variant("fast", "fast under bf16 autocast", bf16=True),
    "crop_bf16": Variant("crop", "crop under bf16 autocast", bf16=True),
    "fast_taesd": Variant("fast", "fast through the tiny decoder (TAESD shape)", decoder="taesd"),
    "latent_head": Variant(
        "fast", "latent DINOv2 head (no decode; head depth 3, width 256)", decoder="latent_head"
    ),
}


# --- models -------------------------------------------------------------------------------------------------


def build_models(resolution: int, device: str, with_unet: bool) -> SimpleNamespace:
    from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from models.dinov2_encoder import DINOv2Encoder
    from models.latent_dino_head import LatentPatchHead

    torch.manual_seed(0)
    m = SimpleNamespace(unet=None)
    with torch.device(device):
        if with_unet:
            m.unet = UNet2DConditionModel(  # stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json
                sample_size=resolution // 8,
                in_channels=4,
                out_channels=4,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=(320, 640, 1280, 1280),
                layers_per_block=2,
                cross_attention_dim=768,
                attention_head_dim=8,
                norm_num_groups=32,
                norm_eps=1e-5,
                act_fn="silu",
                downsample_padding=1,
                flip_sin_to_cos=True,
                freq_shift=0,
                mid_block_scale_factor=1,
            )
            m.unet.requires_grad_(False)
            m.unet.add_adapter(
                LoraConfig(
                    r=32,
                    lora_alpha=32,
                    init_lora_weights="gaussian",
                    target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                )
            )
        from script.bench.bench_urepa_step import SD15_VAE_CONFIG

        m.vae = AutoencoderKL(**SD15_VAE_CONFIG, scaling_factor=0.18215)
        m.vae.requires_grad_(False).eval()
        m.taesd = AutoencoderTiny().requires_grad_(False).eval()  # defaults = madebyollin/taesd's config
        m.dino = DINOv2Encoder(variant="vitb14", resolution=224, input_range="-1_1").model
        m.head = LatentPatchHead(embed_dim=768)
    m.sched = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    m.device, m.variant, m.layers, m.resolution = device, "vitb14", LAYERS, resolution
    return m


def make_term(name: str, m: SimpleNamespace, crop_size: int | None = None) -> PerceptualTerm:
    from models.dinov2_encoder import DINOv2Encoder
    from models.latent_dino_head import LatentDINOv2

    v = VARIANTS[name]
    resolution = v.resolution or default_dino_resolution(v.impl, crop_size or v.crop, m.resolution)
    enc = DINOv2Encoder(variant=m.variant, resolution=resolution, input_range="-1_1", model=m.dino).to(
        m.device
    )
    if m.device == "meta":
        enc._check_range = lambda images: None  # the range check reads values; meta tensors have none
    loss = DINOv2PerceptualLoss(
        enc,
        layers=m.layers,
        loss_type="l2",
        resize="bilinear" if v.impl == "reference" else "bicubic_antialias",
    )
    head = LatentDINOv2(enc, m.head) if v.decoder == "latent_head" else None
    decoder = {"sd": m.vae, "taesd": m.taesd, "latent_head": None}[v.decoder]
    cache = (
        DINOv2TargetCache(loss, storage_device=m.device) if v.impl != "reference" and head is None else None
    )
    return PerceptualTerm(
        loss,
        decoder,
        m.sched.alphas_cumprod.to(m.device),
        "epsilon",
        cache=cache,
        latent_head=head,
        impl=v.impl,
        crop_size=crop_size or v.crop,
        sample_fraction=v.fraction,
    )


def synthetic_images(batch: int, resolution: int, seed: int = 0) -> torch.Tensor:
    """Smooth structured images in [-1, 1]: random octaves (8, 32, 128 px cells) upsampled and summed."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(batch, 3, resolution, resolution)
    for cells, amp in (
        (max(resolution // 64, 2), 1.0),
        (max(resolution // 16, 2), 0.5),
        (resolution // 4, 0.25),
    ):
        noise = torch.randn(batch, 3, cells, cells, generator=g)
        img += amp * F.interpolate(noise, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return torch.tanh(img)


def make_inputs(m: SimpleNamespace, batch: int, resolution: int, encode: bool = False, t: int = 300):
    g = torch.Generator().manual_seed(1)
    h = resolution // 8
    if m.device == "meta":
        images = torch.empty(batch, 3, resolution, resolution, device="meta")
        latents = torch.empty(batch, 4, h, h, device="meta")
    else:
        images = synthetic_images(batch, resolution)
        if encode:
            with torch.no_grad():
                latents = m.vae.encode(images).latent_dist.mean * m.vae.config.scaling_factor
        else:
            latents = torch.randn(batch, 4, h, h, generator=g)
    noise = torch.randn(batch, 4, h, h, generator=g).to(m.device)
    timesteps = torch.full((batch,), t, dtype=torch.long).to(m.device)
    noisy = m.sched.add_noise(latents, noise, timesteps)
    pred = noise + 0.5 * torch.randn(batch, 4, h, h, generator=g).to(m.device)  # an imperfect U-Net output
    return SimpleNamespace(images=images, latents=latents, noisy=noisy, t=timesteps, pred=pred, batch=batch)


def warm_cache(term: PerceptualTerm, x: SimpleNamespace) -> None:
    """Fill the target cache for every crop tile (fast: the whole image), as after the first epochs."""
    if term.cache is None:
        return
    idx, flips = list(range(x.batch)), [0] * x.batch
    factor = x.images.shape[-1] // x.latents.shape[-1]
    side = term.crop_size // factor
    h, w = x.latents.shape[-2:]
    if term.impl == "crop" and (side < h or side < w):
        for tile in crop_tiles(h, w, side):
            boxes = [tile] * x.batch
            term.cache.get(crop_boxes(x.images, boxes, scale=factor), idx, flips, regions=boxes)
    else:
        term.cache.get(x.images, idx, flips)


@contextlib.contextmanager
def variant_context(name: str, term: PerceptualTerm):
    """bf16 autocast and decoder checkpointing for the variants that ask for them."""
    v = VARIANTS[name]
    if v.checkpointing:
        term.decoder.enable_gradient_checkpointing()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if v.bf16 else contextlib.nullcontext()
    try:
        with autocast:
            yield
    finally:
        if v.checkpointing:
            term.decoder.disable_gradient_checkpointing()


def call_term(term: PerceptualTerm, pred: torch.Tensor, x: SimpleNamespace, seed: int = 0) -> torch.Tensor:
    value, _ = term(
        pred,
        x.noisy,
        x.t,
        x.images,
        list(range(x.batch)),
        [0] * x.batch,
        target_latents=x.latents,
        generator=torch.Generator().manual_seed(seed),
    )
    return value


def run_term(name: str, term: PerceptualTerm, x: SimpleNamespace, seed: int = 0):
    """Forward + backward of the term to the U-Net output; (value, grad of the U-Net output)."""
    pred = x.pred.detach().clone().requires_grad_(True)
    with variant_context(name, term):
        value = call_term(term, pred, x, seed)
        if value.requires_grad:  # not when no sample was drawn (--dinov2_sample_fraction < 1)
            value.backward()  # inside the context: checkpointed blocks recompute during backward
    return value.detach(), pred.grad if pred.grad is not None else torch.zeros_like(pred)


def unet_step(m: SimpleNamespace, x: SimpleNamespace, term: PerceptualTerm | None = None, name: str = ""):
    """U-Net LoRA forward + MSE (+ 0.1 x the term on its output) + backward."""
    ehs = torch.zeros(x.batch, 77, 768, device=m.device)
    pred = m.unet(x.noisy, x.t, encoder_hidden_states=ehs).sample
    loss = F.mse_loss(pred, x.pred)
    with variant_context(name, term) if term is not None else contextlib.nullcontext():
        if term is not None:
            loss = loss + 0.1 * call_term(term, pred, x)
        loss.backward()


# --- sections -----------------------------------------------------------------------------------------------


def section_flops(args, names):
    from torch.utils.flop_counter import FlopCounterMode

    m = build_models(args.resolution, "meta", with_unet=True)
    # Batch 2, reported per sample: with --dinov2_sample_fraction 0.5 exactly one of the two is drawn.
    x = make_inputs(m, 2, args.resolution)
    out = {}
    with FlopCounterMode(display=False) as fc:
        unet_step(m, x)
    out["unet_step"] = fc.get_total_flops() / 2
    for name in names:
        term = make_term(name, m, args.crop_size if name == "crop" else None)
        warm_cache(term, x)
        with FlopCounterMode(display=False) as fc:
            run_term(name, term, x)
        out[name] = fc.get_total_flops() / 2
    ref = out.get("reference")
    print(
        f"\n== FLOPs per sample, {args.resolution} px (forward + backward to the U-Net output; batch 2 / 2) =="
    )
    print(f"{'variant':<14} {'TFLOP':>8} {'/ reference':>12} {'/ U-Net step':>13}  what")
    for name in names:
        rel = f"{out[name] / ref:12.3f}" if ref else " " * 12
        print(
            f"{name:<14} {out[name] / 1e12:8.3f} {rel} {out[name] / out['unet_step']:13.3f}  {VARIANTS[name].what}"
        )
    print(f"{'U-Net step':<14} {out['unet_step'] / 1e12:8.3f}  (LoRA rank 32, forward + backward, MSE only)")
    return out


def section_memory(args, names):
    m = build_models(args.resolution, "meta", with_unet=True)
    print(f"\n== Peak live tensor memory (GiB), {args.resolution} px (meta device, LiveTensorPeak) ==")
    print(
        f"{'variant':<14} " + " ".join(f"{f'term b{b}':>9} {f'step b{b}':>9}" for b in (1, args.seed_batch))
    )
    rows = {}
    for name in ["mse_only", *names]:
        cells = []
        for b in (1, args.seed_batch):
            x = make_inputs(m, b, args.resolution)
            term = None
            if name != "mse_only":
                if VARIANTS[name].bf16:
                    cells += [float("nan"), float("nan")]  # autocast casts are not modelled on meta
                    continue
                term = make_term(name, m)
                warm_cache(term, x)
                if b * term.sample_fraction < 1:
                    term.sample_fraction = 1.0  # batch 1: the peak of a step in which the sample is drawn
                with LiveTensorPeak() as mem:
                    run_term(name, term, x)
                cells.append(mem.peak_bytes / 2**30)
            else:
                cells.append(0.0)
            with LiveTensorPeak() as mem:
                unet_step(m, x, term, name)
            cells.append(mem.peak_bytes / 2**30)
        rows[name] = cells
        print(f"{name:<14} " + " ".join(f"{c:9.2f}" for c in cells))
    return rows


def section_time(args, names):
    torch.set_num_threads(args.threads)
    m = build_models(args.resolution, "cpu", with_unet=False)
    x = make_inputs(m, args.batch, args.resolution)
    terms = {name: make_term(name, m) for name in names}
    for name in names:
        warm_cache(terms[name], x)
    load = os.getloadavg()
    print(f"\n== Time, {args.resolution} px, batch {args.batch}, {args.threads} threads, CPU ==")
    print(
        f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)", flush=True
    )
    for name in names[: len(names) if args.warmup else 0]:  # warm-up: oneDNN primitives, allocator
        t0 = time.perf_counter()
        run_term(name, terms[name], x)
        print(f"  warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    times = {n: [] for n in names}
    rss = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            gc.collect()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                run_term(name, terms[name], x, seed=r)
                dt = time.perf_counter() - t0
            times[name].append(dt)
            rss[name].append(mem.extra_mb)
        print(f"  round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.1f} s" for n in names), flush=True)
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for (
        name,
        v,
    ) in VARIANTS.items():  # p < 1: the term runs on a share p of the samples, the rest cost nothing
        base = next(
            (n for n in names if VARIANTS[n] == replace(v, fraction=1.0, what=VARIANTS[n].what)), None
        )
        if v.fraction < 1 and base is not None:
            times[name] = [v.fraction * t for t in times[base]]
            rss[name] = rss[base]
            print(
                f"{name}: expected time = {v.fraction} x {base}'s per round (peak RSS: a step that draws a sample)"
            )
    print(
        f"{'variant':<14} {'median s':>9} {'min-max s':>13} {'ratio to ref':>13} {'ratio min-max':>14} {'RSS+ MB':>8}"
    )
    for name in times:
        ts = times[name]
        if "reference" in names:
            ratios = [a / b for a, b in zip(ts, times["reference"])]
            rat = f"{statistics.median(ratios):13.3f} {min(ratios):6.3f}-{max(ratios):<7.3f}"
        else:
            rat = " " * 28
        print(
            f"{name:<14} {statistics.median(ts):9.1f} {min(ts):6.1f}-{max(ts):<6.1f} {rat} "
            f"{statistics.median(rss[name]):8.0f}"
        )
    return times, rss


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def draws_of(name: str, term: PerceptualTerm, x: SimpleNamespace) -> list[tuple[float, dict]]:
    """Every random outcome of the variant with its probability, as attributes to set on the term."""
    v = VARIANTS[name]
    if v.impl == "crop":
        factor = x.images.shape[-1] // x.latents.shape[-1]
        h, w = x.latents.shape[-2:]
        tiles = crop_tiles(h, w, term.crop_size // factor)
        return [
            (1 / len(tiles), {"crop_boxes_for": lambda x0, im, gen, t=t: [t] * x0.shape[0]}) for t in tiles
        ]
    if v.fraction < 1:
        expected = x.batch * v.fraction
        k0 = int(expected)
        out = []
        for k, pk in ((k0, 1 - (expected - k0)), (k0 + 1, expected - k0)):
            if pk > 0 and k <= x.batch:
                subsets = list(itertools.combinations(range(x.batch), k))
                out += [
                    (pk / len(subsets), {"subsample": lambda sel, gen, s=s: [sel[j] for j in s]})
                    for s in subsets
                ]
        return out
    return [(1.0, {})]


def section_agreement(m: SimpleNamespace, x: SimpleNamespace, label: str, name: str, crop_size: int) -> dict:
    """Variant ``name`` against the full-image term on every sample (fast): its exact expectation over all of its
    random outcomes (tiles, sample subsets) and its single draws, value and gradient w.r.t. the U-Net output."""
    term = make_term(name, m, crop_size if name in ("crop", "crop_dino224") else None)
    warm_cache(term, x)
    draws = []
    for prob, attrs in draws_of(name, term, x):
        for key, fn in attrs.items():
            setattr(term, key, fn)
        v, g = run_term(name, term, x)
        draws.append((prob, v, g))
    ev = sum(prob * v for prob, v, _ in draws)
    eg = sum(prob * g for prob, _, g in draws)
    full = make_term("fast", m)
    warm_cache(full, x)
    fv, fg = run_term("fast", full, x)
    single = [_cos(g, fg) for _, _, g in draws if g.abs().sum() > 0]
    spread = [float(v / fv - 1) for _, v, _ in draws]
    r = dict(
        value_full=float(fv),
        value_expected=float(ev),
        rel_err=float((ev - fv).abs() / fv.abs()),
        grad_cos=_cos(eg, fg),
        grad_norm_ratio=float(eg.norm() / fg.norm()),
        single_draw_cos=statistics.mean(single),
        draw_value_spread=(min(spread), max(spread)),
    )
    print(
        f"\n== Agreement, {label}: {name} ({VARIANTS[name].what}"
        f"{f'; crop {term.crop_size} px' if term.impl == 'crop' else ''}; DINO {term.loss.encoder.resolution} px, "
        f"{len(draws)} outcomes) vs the full-image term on every sample (fast) ==\n"
        f"value: full {r['value_full']:.5f}, expectation {r['value_expected']:.5f}, relative error "
        f"{r['rel_err']:.2e} (single draws {r['draw_value_spread'][0]:+.3f} .. {r['draw_value_spread'][1]:+.3f})\n"
        f"gradient w.r.t. the U-Net output: cosine {r['grad_cos']:.4f} (expectation), "
        f"{r['single_draw_cos']:.3f} (single draws with a gradient, mean), norm ratio {r['grad_norm_ratio']:.3f}",
        flush=True,
    )
    return r


def tiny_setup():
    """The tiny assets: SD-1.5-shaped tiny VAE, tiny DINOv2 (4 blocks), four 64 px hazelnut images."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from PIL import Image

    from models.dinov2_encoder import DINOv2Encoder
    from preprocessing.make_tiny_assets import ensure_tiny_assets

    tiny = ensure_tiny_assets(Path(__file__).resolve().parents[2] / ".cache" / "tiny")
    m = SimpleNamespace(
        device="cpu", unet=None, taesd=None, head=None, variant="tiny14", layers=[1, 3], resolution=64
    )
    m.vae = AutoencoderKL.from_pretrained(tiny["sd15"], subfolder="vae").requires_grad_(False).eval()
    m.dino = DINOv2Encoder.from_pretrained(tiny["dinov2_official"], variant="tiny14", resolution=224).model
    m.sched = DDPMScheduler.from_pretrained(tiny["sd15"], subfolder="scheduler")
    files = sorted((tiny["mvtec"] / "hazelnut" / "train" / "good").glob("*.png"))[:4]
    images = torch.stack(
        [
            torch.from_numpy(__import__("numpy").asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1)
            for f in files
        ]
    )
    images = images.float() / 127.5 - 1
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        latents = m.vae.encode(images).latent_dist.mean * m.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([50, 200, 400, 700])[: len(files)]
    x = SimpleNamespace(
        images=images,
        latents=latents,
        noisy=m.sched.add_noise(latents, noise, t),
        t=t,
        pred=noise + 0.5 * torch.randn(latents.shape, generator=g),
        batch=len(files),
    )
    return m, x


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=512, help="training image side (multiple of 64)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs every --time variant once)")
    p.add_argument("--batch", type=int, default=1, help="batch of the timed calls")
    p.add_argument("--warmup", type=int, choices=(0, 1), default=1, help="one untimed call per variant first")
    p.add_argument("--seed_batch", type=int, default=SEED_BATCH, help="second batch size of the memory table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--crop_size", type=int, default=256, help="crop side (image px) of the 'crop' variant")
    p.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="flops/memory variants"
    )
    p.add_argument(
        "--time",
        nargs="+",
        choices=list(VARIANTS),
        default=["reference", "fast", "crop"],
        help="timed variants",
    )
    p.add_argument(
        "--agree",
        nargs="+",
        choices=[n for n in VARIANTS if n not in ("fast", "reference")],
        default=["fast_p05", "crop"],
        help="agreement: the variants compared with the full-image term",
    )
    p.add_argument(
        "--tiny", action="store_true", help="agreement on the tiny assets instead of random SD-1.5 models"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}, {args}", flush=True)
    if args.tiny:
        m, x = tiny_setup()
        for name in args.agree:
            section_agreement(m, x, "tiny assets (64 px, batch 4)", name, 32)
        return 0
    if "flops" in args.sections:
        section_flops(args, args.variants)
    if "memory" in args.sections:
        section_memory(args, args.variants)
    if "time" in args.sections:
        section_time(args, args.time)
    if "agreement" in args.sections:
        m = build_models(args.resolution, "cpu", with_unet=False)
        x = make_inputs(m, 1, args.resolution, encode=True)
        for name in args.agree:
            section_agreement(
                m, x, f"{args.resolution} px, random SD-1.5 VAE and DINOv2", name, args.crop_size
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
