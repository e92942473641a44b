"""Size and cost of the stage-2 branch-interaction presets on the real SD-1.5 U-Net shapes.

    .env/bin/python script/bench/bench_dual_interaction.py [--resolution 512] [--rank 32]

Builds SD-1.5's U-Net from its config (stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json, the
shapes only: no weights are read; on the meta device, so nothing is allocated), wraps it in DualLoRAUNet for
each interaction preset and reports:

* trainable parameters: LoRA (two sets, U-Net only) and interaction modules;
* forward FLOPs of one (blend, fg) pair at --resolution, counted by torch's FlopCounterMode (matmuls,
  convolutions and attention), with and without the interaction modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import json

import torch


def build(preset: str | None, rank: int):
    from diffusers import UNet2DConditionModel

    from models.dual_lora import DualLoRAUNet
    from script.bench.bench_urepa_step import SD15_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        if preset is None:  # LoRA only: the interaction-free reference point
            return DualLoRAUNet(unet, rank=rank, dual_mode="shared")
        return DualLoRAUNet(unet, rank=rank, interaction_preset=preset)


def forward_flops(dual, resolution: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    side = resolution // 8
    with torch.device("meta"):
        x = torch.zeros(1, 4, side, side)
        ehs = torch.zeros(1, 77, 768)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dual(x, x, torch.tensor([500], device="meta"), ehs, ehs)
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--rank", type=int, default=32)
    args = p.parse_args()
    base = build(None, args.rank)
    base_flops = forward_flops(base, args.resolution)
    rows = {"no_interaction": {"forward_gflops_per_pair": base_flops / 1e9}}
    for preset in ("official", "light"):
        dual = build(preset, args.rank)
        lora = sum(
            p.numel()
            for layer in dual.lora_layers().values()
            for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]
        )
        inter = sum(p.numel() for p in dual.interactions.parameters())
        flops = forward_flops(dual, args.resolution)
        rows[preset] = {
            "attention_layers": len(dual.interactions),
            "lora_params_two_sets": lora,
            "interaction_params": inter,
            "forward_gflops_per_pair": flops / 1e9,
            "interaction_flops_share": (flops - base_flops) / flops,
        }
    print(json.dumps({"resolution": args.resolution, "rank": args.rank, **rows}, indent=2))


if __name__ == "__main__":
    main()
