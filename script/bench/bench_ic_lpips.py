"""IC-LPIPS with cached features vs the official per-pair recomputation: same value, speed-up.

    python script/bench/bench_ic_lpips.py --num_images 500 --num_centres 6 --resolution 64

Synthetic images of random size (64..256 px, resized to --resolution as the protocol does) and a
random-weight VGG16 backbone (timing only; the LPIPS heads are the real ones). The baseline calls
``lpips(x, y)`` for every centre comparison and every member pair, as the official script does.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import time

import torch
import torch.nn.functional as F

from eval.ic_lpips import LPIPSFeatureSpace, LPIPSRecomputeSpace, ic_lpips
from losses.lpips_vgg import build_lpips_vgg


def synthetic(n: int, resolution: int, gen: torch.Generator) -> list[torch.Tensor]:
    out = []
    for _ in range(n):
        s = int(torch.randint(64, 257, (1,), generator=gen))
        x = torch.rand(1, 3, s, s, generator=gen) * 2 - 1
        out.append(F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True)[0])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_images", type=int, default=500, help="generated images")
    p.add_argument("--num_centres", type=int, default=6, help="cluster centres (hazelnut defects: 6)")
    p.add_argument("--resolution", type=int, default=64, help="LPIPS input size (protocol: 256)")
    p.add_argument("--cluster_size", type=int, default=50, help="members per cluster")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    model = build_lpips_vgg(pretrained_backbone=False, device=args.device)
    generated = synthetic(args.num_images, args.resolution, gen)
    centres = synthetic(args.num_centres, args.resolution, gen)
    kw = dict(cluster_size=args.cluster_size, seed=0, batch_size=16, show_progress=False)
    t0 = time.perf_counter()
    fast = ic_lpips(generated, centres, LPIPSFeatureSpace(model, args.device, args.resolution), **kw)
    t1 = time.perf_counter()
    slow = ic_lpips(generated, centres, LPIPSRecomputeSpace(model, args.device, args.resolution), **kw)
    t2 = time.perf_counter()
    pairs = sum(m * (m - 1) // 2 for m in fast.member_counts)
    print(
        f"images {args.num_images}, centres {args.num_centres}, resolution {args.resolution}, "
        f"member pairs {pairs}, device {args.device}, threads {args.threads}"
    )
    print(
        f"cached features : IC-LPIPS {fast.value:.8f}  {t1 - t0:8.2f} s  (recomputed members: {fast.recomputed})"
    )
    print(f"per-pair (official): IC-LPIPS {slow.value:.8f}  {t2 - t1:8.2f} s")
    print(
        f"|difference| {abs(fast.value - slow.value):.2e}, same assignment: {fast.assignment == slow.assignment}"
    )
    print(f"speed-up {(t2 - t1) / (t1 - t0):.1f}x")


if __name__ == "__main__":
    main()
