"""U-REPA training throughput on a GPU: train_sd15.py itself, SD-1.5-shaped U-Net, real-size caches, bf16.

    python script/bench/bench_urepa_gpu.py --batch 48 64 --steps 15 --log_every 5

No weights or images are needed: a random-init UNet2DConditionModel with SD-1.5's config (860M parameters) is
saved as a local pipeline folder, and LMDB caches with the real record sizes (latent [4,64,64] fp16, DINOv2
ViT-L/14 tokens [256,1024] fp16, CLIP [1001,77,768]) are written next to it. Then ``train_sd15.main`` runs with
``configs/sd15_repa_A.yaml`` (LoRA rank 32 on the whitelist, AlignHead 1280 -> 1024, lambda 0.8, w 3, EMA,
gradient clipping, AdamW) for each batch size, once aligned (lambda 0.8) and once as the baseline (lambda 0),
alternating. Reported per run: steps/s and samples/s over the last ``--log_every`` steps (the first steps, with
cuDNN autotuning and allocator growth, are not counted), and the peak GPU memory. A run that runs out of memory
is reported as OOM and repeated with ``model.gradient_checkpointing=true``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import gc
import json
import statistics
import tempfile
import time

import torch

from script.bench.bench_urepa_data import write_synthetic_caches
from script.bench.bench_urepa_step import SD15_UNET_CONFIG

REPO = Path(__file__).resolve().parents[2]


def write_random_sd15(root: Path) -> Path:
    """A pipeline folder with what train_sd15 reads: unet/ (random SD-1.5 U-Net) and scheduler/."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from preprocessing.tiny_sd15 import SD15_SCHEDULER_CONFIG

    torch.manual_seed(0)
    UNet2DConditionModel(**SD15_UNET_CONFIG).save_pretrained(root / "unet")
    cfg = {k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k not in ("skip_prk_steps", "set_alpha_to_one")}
    DDPMScheduler(**cfg).save_pretrained(root / "scheduler")
    return root


def run_once(sd_dir: Path, data: Path, out: Path, batch: int, lam: float, args, checkpointing: bool) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    import train_sd15

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    overrides = [
        f"output_dir={out}",
        f"model.pretrained={sd_dir}",
        f"model.gradient_checkpointing={str(checkpointing).lower()}",
        f"data.csv={data / 'train.csv'}",
        f"data.latent_dir={data / 'lat'}",
        f"data.dino_dir={data / 'dino'}",
        f"data.clip_embeddings={data / 'clip.pt'}",
        f"data.num_workers={args.num_workers}",
        f"loss.align_coeff={lam}",
        f"train.batch_size={batch}",
        f"train.max_steps={args.steps}",
        f"train.log_every={args.log_every}",
        "train.checkpointing_steps=0",
        "train.sample_every=0",
        f"train.mixed_precision={args.mixed_precision}",
    ]
    t0 = time.perf_counter()
    logs = train_sd15.main(["--config", str(REPO / args.config), "--set", *overrides])
    return {
        "batch": batch,
        "lambda": lam,
        "gradient_checkpointing": checkpointing,
        "steps_per_s": logs["steps_per_s"],
        "samples_per_s": logs["steps_per_s"] * batch,
        "peak_gib": logs.get("gpu_mem_peak_gib", float("nan")),
        "loss": logs.get("loss"),
        "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[48, 64], help="Per-GPU batch sizes.")
    p.add_argument("--steps", type=int, default=15, help="Training steps per run.")
    p.add_argument("--log_every", type=int, default=5, help="The last this-many steps are timed.")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.8, 0.0], help="loss.align_coeff values.")
    p.add_argument("--mixed_precision", default="bf16", choices=["no", "bf16", "fp16"])
    p.add_argument("--num_workers", type=int, default=4, help="DataLoader workers.")
    p.add_argument("--config", default="configs/sd15_repa_A.yaml", help="Base config (repo-relative).")
    p.add_argument(
        "--work_dir", default=None, help="Where the random U-Net and caches go (default: a temp dir)."
    )
    p.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    p.add_argument(
        "--allow_cpu", action="store_true", help="Dry-run the script on CPU (tiny --batch/--steps)."
    )
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("bench_urepa_gpu.py needs a CUDA GPU (use bench_urepa_step.py on CPU)")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_urepa_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    sd_dir = write_random_sd15(work / "sd15")
    data = work / "data"
    data.mkdir(exist_ok=True)
    write_synthetic_caches(data, max(args.batch) * args.steps)
    print(
        f"random SD-1.5 U-Net + {max(args.batch) * args.steps} cached samples in {time.perf_counter() - t:.0f} s"
    )
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"device: {device}, torch {torch.__version__}, {args.mixed_precision}")

    results = []
    for batch in args.batch:
        for i, lam in enumerate(args.lambdas):
            for checkpointing in (False, True):
                try:
                    r = run_once(sd_dir, data, work / f"run_b{batch}_{i}", batch, lam, args, checkpointing)
                except torch.OutOfMemoryError:
                    r = {"batch": batch, "lambda": lam, "gradient_checkpointing": checkpointing, "oom": True}
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                results.append(r)
                print(json.dumps(r), flush=True)
                if not r.get("oom"):
                    break  # checkpointing only where the plain run does not fit

    print("\n| batch | lambda | grad. checkpointing | steps/s | samples/s | peak GPU memory (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if r.get("oom"):
            print(f"| {r['batch']} | {r['lambda']} | {r['gradient_checkpointing']} | OOM | | |")
        else:
            print(
                f"| {r['batch']} | {r['lambda']} | {r['gradient_checkpointing']} | {r['steps_per_s']:.2f} | "
                f"{r['samples_per_s']:.1f} | {r['peak_gib']:.1f} |"
            )
    # Repeated lambdas (e.g. --lambdas 0 0.8 0.8 0, an ABBA order that cancels a linear drift) are averaged.
    for batch in args.batch:
        rates: dict[float, list[float]] = {}
        for r in results:
            if r["batch"] == batch and not r.get("oom") and not r["gradient_checkpointing"]:
                rates.setdefault(r["lambda"], []).append(r["steps_per_s"])
        base = rates.get(0.0)
        for lam, got in sorted(rates.items()):
            if lam == 0.0 or not base:
                continue
            ratio = statistics.mean(base) / statistics.mean(got)
            print(
                f"batch {batch}: lambda {lam} vs 0 (no grad. checkpointing): {100 * (ratio - 1):+.1f} % time/step "
                f"(steps/s: lambda {lam} {[round(x, 3) for x in got]}, lambda 0 {[round(x, 3) for x in base]})"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
