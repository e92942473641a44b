"""Per-step training time of U-REPA (lambda 0.8, w 3) vs the baseline (lambda 0) on an SD-1.5-shaped U-Net.

    python script/bench/bench_urepa_step.py [--latent 32] [--batch 1] [--steps 4] [--layers mid]
    python script/bench/bench_urepa_step.py --device cuda --mixed_precision bf16 --latent 64 --batch 48 \
        --steps 10 --profile      # on a GPU; --profile also lists the CUDA kernels that differ

Random-init UNet2DConditionModel with SD-1.5's real config (860M params; no weights needed), LoRA rank 32 on the
whitelist, AlignHead 1280 -> 1024 upsampled to 16x16 (DINOv2 ViT-L/14 at 224 px). A step = forward, loss,
backward, AdamW step. The two settings alternate step by step on the same model so machine load drifts hit
both alike; the median of each is reported with the ratio. The baseline calls the model with
return_tokens=False (no head, no alignment loss), exactly the code path of ``loss.align_coeff=0``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import statistics
import time

import torch

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
)
# stable-diffusion-v1-5's vae/config.json (84M params), for FLOP counts and benchmarks without weights
SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--latent", type=int, default=32, help="Latent side (64 = 512 px images; 32 keeps CPU runs short)."
    )
    p.add_argument("--batch", type=int, default=1, help="Batch size (>= 2 exercises the manifold loss).")
    p.add_argument(
        "--steps", type=int, default=4, help="Timed steps per setting (after 1 warm-up step each)."
    )
    p.add_argument("--layers", nargs="+", default=["mid"], help="Aligned layers.")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    p.add_argument("--device", default="cpu", help="cpu or cuda.")
    p.add_argument(
        "--mixed_precision",
        default="no",
        choices=["no", "bf16"],
        help="bf16: autocast and frozen weights in bf16, as train_sd15.py does.",
    )
    p.add_argument("--profile", action="store_true", help="Print the top CUDA kernels of one step of each.")
    p.add_argument(
        "--head_reps", type=int, default=50, help="Repetitions of the head + alignment-loss timing."
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import UNet2DConditionModel

    from losses.urepa import URepaLoss
    from models.sd15_unet_aligned import SD15UNetAligned

    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    model = SD15UNetAligned(
        unet, align_layers=args.layers, D=1024, grid=(16, 16), lora_config={"rank": 32}, verbose=False
    ).to(device)
    amp = args.mixed_precision == "bf16"
    if amp:
        for q in model.parameters():
            if not q.requires_grad:
                q.data = q.data.to(torch.bfloat16)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    from diffusers import DDPMScheduler

    ac = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # SD-1.5's
    losses = {
        0.8: URepaLoss(ac, align_coeff=0.8, manifold_coeff=3.0).to(device),
        0.0: URepaLoss(ac, align_coeff=0.0).to(device),
    }
    g = torch.Generator(device=device).manual_seed(0)
    b, s = args.batch, args.latent
    x = torch.randn(b, 4, s, s, generator=g, device=device)
    ctx = torch.randn(b, 77, 768, generator=g, device=device)
    dino = {
        layer: torch.nn.functional.normalize(torch.randn(b, 256, 1024, generator=g, device=device), dim=-1)
        for layer in args.layers
    }

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def step(lam: float) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = losses[lam](model, x, dino, ctx, generator=g)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0

    times: dict[float, list[float]] = {0.8: [], 0.0: []}
    for lam in (0.8, 0.0):
        step(lam)  # warm-up
    for i in range(args.steps):
        order = (0.8, 0.0) if i % 2 == 0 else (0.0, 0.8)
        for lam in order:
            times[lam].append(step(lam))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        for lam in (0.0, 0.8):
            with profile(activities=acts) as prof:
                step(lam)
            key = "cuda_time_total" if cuda else "cpu_time_total"
            print(f"\n### profile of one step, lambda={lam}")
            print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))
    # The only extra work of lambda > 0 is head + alignment loss (forward and backward); timing it alone over
    # many repetitions is robust to the machine-load noise that full-step timings on a shared CPU suffer from.
    from losses.urepa import alignment_loss
    from models.sd15_unet_aligned import capture_features

    with (
        capture_features(unet, args.layers) as feats,
        torch.no_grad(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp),
    ):
        unet(x, torch.full((b,), 500, device=device), encoder_hidden_states=ctx)
    head_times = []
    for _ in range(args.head_reps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            tokens = {
                layer: model.heads[layer](feats[layer].clone().requires_grad_(True)) for layer in args.layers
            }
            loss_align = 0.8 * alignment_loss(tokens, dino, 3.0)["loss_align"]
        loss_align.backward()
        sync()
        head_times.append(time.perf_counter() - t0)
    opt.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    head = statistics.median(head_times)
    print(
        f"SD-1.5 U-Net (random init, {sum(q.numel() for q in unet.parameters()) / 1e6:.0f}M params), "
        f"LoRA trainable {sum(q.numel() for q in params) / 1e6:.2f}M, latent {s}x{s}, batch {b}, "
        f"layers {args.layers}, {args.device} ({args.mixed_precision}), {args.threads} threads, "
        f"{args.steps} steps each"
    )
    for lam in (0.0, 0.8):
        print(
            f"  lambda={lam}: median {med[lam]:.3f} s/step  (all: {', '.join(f'{t:.3f}' for t in times[lam])})"
        )
    print(
        f"  overhead lambda 0.8 vs 0 (full steps): {100 * (med[0.8] / med[0.0] - 1):+.2f} %  "
        f"(ratio {med[0.8] / med[0.0]:.4f})"
    )
    print(
        f"  head + alignment loss fwd/bwd alone: median {1000 * head:.2f} ms over {args.head_reps} reps "
        f"= {100 * head / med[0.0]:.3f} % of a baseline step"
    )


if __name__ == "__main__":
    main()
