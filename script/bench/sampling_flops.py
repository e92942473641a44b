"""FLOPs per generated sample of every sampler in eval/, counted on the meta device, and the GPU-hours they imply.

    .env/bin/python script/bench/sampling_flops.py [--peak_tflops 989] [--utilisation 0.23] [--json FILE]

Counts (``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions, attention; batch 1, no weights):
the SD-1.5 U-Net forward at 512 px (64x64 latents, 77 text tokens) with the LoRA each use carries (U-REPA
config A: rank 32 on attention and ResNet convolutions; stage 1: rank 4 on attention; stage 2: the dual U-Net,
rank 4, DualAnoDiff's interaction modules, both branches), the SD-VAE decoder (64 -> 512), and the FID Inception
at 299 px. The number of U-Net evaluations per sample comes from the sampler's own timesteps (diffusers, SD-1.5's
scheduler config) and the guidance rule (U-REPA: CFG only where guidance_low <= t/T <= guidance_high, REPA's
interval; anomaly generation: CFG at every step). Samples/s per GPU = peak x utilisation / FLOPs per sample;
the utilisation is an assumption (default: the 23 % measured for train_sd15.py on an H100, docs/throughput.md),
not a measurement of sampling. Sharded sampling scales linearly (no communication between processes), so N GPUs
take 1/N of the time. Printed as the markdown tables of docs/scaling.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import json

import torch

# stable-diffusion-v1-5 scheduler/scheduler_config.json (the keys that set the timesteps)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    clip_sample=False,
)
GPUS = (1, 8, 16)
# Assumed GPU throughput (docs/scaling.md): H100 SXM dense bf16 tensor-core peak x the MFU measured for
# train_sd15.py on an H100 (docs/throughput.md). script/reproduce/estimate.py uses the same figures.
H100_BF16_PEAK_TFLOPS = 989.0
ASSUMED_UTILISATION = 0.23


def count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def model_flops() -> dict[str, int]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig

    from eval.inception import build_fid_inception_v3
    from models.dual_lora import DualLoRAUNet
    from script.bench.bench_urepa_step import SD15_UNET_CONFIG, SD15_VAE_CONFIG

    out = {}
    with torch.device("meta"):
        x = torch.zeros(1, 4, 64, 64)
        t = torch.tensor([500])
        ehs = torch.zeros(1, 77, 768)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        out["unet"] = count(lambda: unet(x, t, ehs))
        attn = ["to_q", "to_k", "to_v", "to_out.0"]
        unet.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=[*attn, "conv1", "conv2"]), "urepa")
        out["unet_urepa_lora32"] = count(lambda: unet(x, t, ehs))
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=attn), "stage1")
        out["unet_stage1_lora4"] = count(lambda: unet(x, t, ehs))
        dual = DualLoRAUNet(UNet2DConditionModel(**SD15_UNET_CONFIG), rank=4, interaction_preset="official")
        out["dual_unet_pair"] = count(lambda: dual(x, x, t, ehs, ehs))
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        out["vae_decode"] = count(lambda: vae.decode(x))
        inception = build_fid_inception_v3().eval()
        out["inception_299"] = count(lambda: inception(torch.zeros(1, 3, 299, 299)))
    return out


def unet_evals(sampler: str, steps: int, cfg: bool, low: float = 0.0, high: float = 1.0) -> int:
    """U-Net evaluations per sample: one per timestep, two where guidance is on."""
    from models.schedulers import make_scheduler

    sched = make_scheduler(sampler, SD15_SCHEDULER)
    sched.set_timesteps(steps)
    total = sched.config.num_train_timesteps
    return sum(2 if cfg and low <= float(ts) / total <= high else 1 for ts in sched.timesteps)


def rows(flops: dict[str, int], peak: float, util: float) -> list[dict]:
    per_s = peak * 1e12 * util
    urepa = flops["unet_urepa_lora32"]
    out = []
    for name, sampler, steps, low, high in (
        ("U-REPA FID (seed: NFE 250, CFG 7.5 on t/T <= 0.7)", "ddpm", 250, 0.0, 0.7),
        ("U-REPA FID, CFG everywhere", "ddpm", 250, 0.0, 1.0),
        ("U-REPA FID, evaluate_sd15 default", "dpmsolver++", 25, 0.0, 0.7),
        ("U-REPA FID, ddim 50", "ddim", 50, 0.0, 0.7),
        ("U-REPA FID, pndm 50", "pndm", 50, 0.0, 0.7),
    ):
        n = unet_evals(sampler, steps, True, low, high)
        f = n * urepa + flops["vae_decode"] + flops["inception_299"]
        out.append(
            dict(use=name, sampler=sampler, steps=steps, unet_evals=n, tflop=f / 1e12, per_s=per_s / f)
        )
    for name, sampler, steps in (
        ("stage 1 image, preset fast", "ddim", 50),
        ("stage 1 image, preset official", "pndm", 100),
    ):
        n = unet_evals(sampler, steps, True)
        f = n * flops["unet_stage1_lora4"] + flops["vae_decode"]
        out.append(
            dict(use=name, sampler=sampler, steps=steps, unet_evals=n, tflop=f / 1e12, per_s=per_s / f)
        )
    for name, sampler, steps in (
        ("stage 2 pair, preset fast", "ddim", 50),
        ("stage 2 pair, preset official (DualAnoDiff)", "pndm", 100),
        ("stage 2 pair, dpmsolver++ 25", "dpmsolver++", 25),
        ("stage 2 pair, ddpm 100", "ddpm", 100),
    ):
        n = unet_evals(sampler, steps, True)  # a dual evaluation runs both branches
        f = n * flops["dual_unet_pair"] + 2 * flops["vae_decode"]
        out.append(
            dict(use=name, sampler=sampler, steps=steps, unet_evals=n, tflop=f / 1e12, per_s=per_s / f)
        )
    return out


def jobs(table: list[dict]) -> list[dict]:
    by_use = {r["use"]: r for r in table}
    seed = by_use["U-REPA FID (seed: NFE 250, CFG 7.5 on t/T <= 0.7)"]
    mvtec = by_use["stage 2 pair, preset official (DualAnoDiff)"]
    out = []
    for name, n, row in (
        ("FID-10k, one checkpoint", 10_000, seed),
        ("FID-50k, one checkpoint", 50_000, seed),
        (
            "FID-10k curve: config A (60k steps, every 5k = 12 checkpoints) x aligned + baseline",
            24 * 10_000,
            seed,
        ),
        ("MVTec generation: 1,000 pairs x 73 defect types", 73_000, mvtec),
    ):
        hours = n / row["per_s"] / 3600
        out.append(dict(job=name, samples=n, gpu_hours=hours, **{f"wall_h_{g}gpu": hours / g for g in GPUS}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--peak_tflops", type=float, default=H100_BF16_PEAK_TFLOPS, help="H100 SXM dense bf16 peak (TFLOP/s)."
    )
    p.add_argument(
        "--utilisation",
        type=float,
        default=ASSUMED_UTILISATION,
        help="assumed fraction of the peak (measured training: 0.23).",
    )
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args()
    flops = model_flops()
    print("| model (batch 1) | GFLOP |\n|---|---|")
    for k, v in flops.items():
        print(f"| {k} | {v / 1e9:,.1f} |")
    table = rows(flops, args.peak_tflops, args.utilisation)
    print(f"\nassumed: {args.peak_tflops:g} TFLOP/s x {args.utilisation:.0%} = "
          f"{args.peak_tflops * args.utilisation:,.0f} TFLOP/s per GPU\n")  # fmt: skip
    print(
        "| use | sampler | steps | U-Net evals / sample | TFLOP / sample | samples/s per GPU |\n|---|---|---|---|---|---|"
    )
    for r in table:
        print(
            f"| {r['use']} | {r['sampler']} | {r['steps']} | {r['unet_evals']} | {r['tflop']:.1f} | {r['per_s']:.2f} |"
        )
    print("\n| job | samples | GPU-hours | 1 GPU (h) | 8 GPUs (h) | 16 GPUs (h) |\n|---|---|---|---|---|---|")
    for j in jobs(table):
        walls = " | ".join(f"{j[f'wall_h_{g}gpu']:.2f}" for g in GPUS)
        print(f"| {j['job']} | {j['samples']:,} | {j['gpu_hours']:.1f} | {walls} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"flops": flops, "samplers": table, "jobs": jobs(table)}, indent=1)
        )


if __name__ == "__main__":
    main()
