"""Cost of the DINOv2 perceptual loss in a stage-1 training step (CPU, random weights, real SD-1.5 shapes).

    .env/bin/python script/bench/bench_dinov2_loss.py [--resolution 128] [--steps 3]

Per-step time (median) and peak RSS of one stage-1 LoRA step, batch 1:
  (a) MSE only;
  (b) the straightforward DINOv2 loss: decode the predicted x0 AND the target latent through the VAE,
      DINOv2 at 518 px, all blocks, every step;
  (c) ours at the defaults: decode only the prediction, target features from the training image
      (cached per image and flip), DINOv2 at 224 px, blocks up to the deepest requested layer.
Prints ((c)-(a)) / ((b)-(a)) (target <= 0.5). Each variant runs in its own process so that its peak
memory is its own. U-Net/VAE: SD-1.5 configs (widths 320/640/1280/1280, cross-attn 768; VAE 128/256/512/512),
DINOv2: ViT-B/14 shape, all random (no weights needed).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LAYERS = [3, 6, 9, 11]


def build(resolution: int):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json
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
    )
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=32,
            lora_alpha=32,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )
    )
    vae = (
        AutoencoderKL(  # SD-1.5 vae/config.json
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=resolution,
            scaling_factor=0.18215,
        )
        .requires_grad_(False)
        .eval()
    )
    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    return unet, vae, sched


def child(mode: str, resolution: int, steps: int) -> dict:
    from losses.dinov2_perceptual import DINOv2PerceptualLoss, DINOv2TargetCache, decode_latents, predicted_x0
    from models.dinov2_encoder import DINOv2Encoder

    torch.set_num_threads(2)
    unet, vae, sched = build(resolution)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    dino_res = 518 if mode == "b" else 224
    enc = DINOv2Encoder(variant="vitb14", resolution=dino_res, input_range="-1_1") if mode != "a" else None
    loss_fn = DINOv2PerceptualLoss(enc, layers=LAYERS, loss_type="l2") if enc is not None else None
    cache = DINOv2TargetCache(loss_fn) if mode == "c" else None
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, resolution, resolution, generator=g) * 2 - 1
    ehs = torch.randn(1, 77, 768, generator=g)
    times = []
    for step in range(steps + 1):  # step 0 = warm-up (fills the cache in mode c)
        t0 = time.perf_counter()
        with torch.no_grad():
            latents = vae.encode(image).latent_dist.sample(generator=g) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (1,), generator=g)
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=ehs).sample
        loss = F.mse_loss(pred, noise)
        if mode != "a":
            x0 = predicted_x0(pred, noisy, t, sched.alphas_cumprod, "epsilon")
            pred_img = decode_latents(vae, x0).clamp(-1, 1)
            if mode == "b":
                with torch.no_grad():
                    target_img = decode_latents(vae, latents).clamp(-1, 1)  # decode of the target latent
                    out = enc(target_img, layers=LAYERS, return_patch_tokens=True)  # all blocks + final norm
                    target = {k: F.normalize(v, dim=-1) for k, v in out.intermediate.items()}
                out = enc(pred_img, layers=LAYERS, return_patch_tokens=True)
                feats = {k: F.normalize(v, dim=-1) for k, v in out.intermediate.items()}
                dino = sum((feats[k] - target[k]).square().mean() for k in LAYERS) / len(LAYERS)
            else:
                target = cache.get(image, [0], [0])
                dino = loss_fn(pred_img, target)[0].mean()
            loss = loss + 0.1 * dino
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "median_s": statistics.median(times), "times": times, "peak_rss_mb": peak_mb}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=128, help="training image side (multiple of 64)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--child", choices=["a", "b", "c"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.resolution, args.steps)))
        return 0
    results = {}
    for mode in ("a", "b", "c"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--resolution",
                str(args.resolution),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(
            f"({mode}) median {r['median_s']:.2f} s/step  steps {[round(x, 2) for x in r['times']]}  "
            f"peak RSS {r['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    a, b, c = (results[m]["median_s"] for m in "abc")
    print(
        f"overhead straightforward (b)-(a) = {b - a:.2f} s, ours (c)-(a) = {c - a:.2f} s, "
        f"ratio ((c)-(a))/((b)-(a)) = {(c - a) / (b - a):.3f} (target <= 0.5)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
