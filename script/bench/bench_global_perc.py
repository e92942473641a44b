"""GlobalPercLoss vs the straightforward design, DINOv2 ViT-S/14 shape (random weights), 504 px, batch 1, CPU.

    python script/bench/bench_global_perc.py [--iters 3] [--resolution 504] [--threads 2]

Straightforward design ("naive"): forward hooks append every hooked output to a list in both passes (target
under no_grad), and the weighted per-hook losses are computed at the end, so all target activations, all
prediction activations and every loss graph coexist. GlobalPercLoss ("ours") computes each hook's loss in the
prediction pass, frees the target activation at once, and keeps one gradient tensor per hook for backward.

Each variant runs in its own subprocess (fresh allocator, no cross-talk). Per iteration it measures
forward+backward wall time and the peak resident set size above the RSS just before the call, sampled every
0.5 ms by a thread reading ``/proc/self/statm`` (PyTorch CPU tensors come from malloc/mmap, so tracemalloc does
not see them, and ``ru_maxrss`` is a process-lifetime maximum that model construction could dominate). The
parent prints both variants and the ratios side by side; the loss values and input gradients must agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import json
import statistics
import subprocess
import time

import torch

from utils.memory import PeakRSS


def naive_loss(model, cfg, pred, target):
    """The straightforward design (see module docstring)."""
    from losses.global_perc import weight_curve

    types = tuple(cfg.modules_to_hook)
    mods = [m for m in model.modules() if isinstance(m, types)]
    index = {id(m): k for k, m in enumerate(mods)}
    store: list = []
    handles = [m.register_forward_hook(lambda m, i, o: store.append((index[id(m)], o))) for m in mods]
    try:
        with torch.no_grad():
            model(cfg.transform_normalization(target) if cfg.transform_normalization else target)
        targets = list(store)
        store.clear()
        model(cfg.transform_normalization(pred) if cfg.transform_normalization else pred)
        preds = list(store)
    finally:
        for h in handles:
            h.remove()
    slot: dict[int, int] = {}  # weight slots in firing order (GlobalPercLoss's default, as the reference)
    for k, _ in targets:
        slot.setdefault(k, len(slot))
    w = weight_curve(len(slot), cfg.start_weight, cfg.end_weight, cfg.curve_force)
    terms = [w[slot[k]] * cfg.loss_func(p, t) for (k, p), (_, t) in zip(preds, targets)]
    return torch.stack(terms).sum() / len(terms)


def worker(variant: str, resolution: int, iters: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    from torch import nn
    from transformers.activations import GELUActivation

    from losses.global_perc import GlobalPercConfig, GlobalPercLoss
    from losses.normalized_tensor_loss import NormalizedTensorLoss
    from models.dinov2_encoder import DINOv2Encoder

    torch.manual_seed(0)
    model = DINOv2Encoder(variant="vits14", resolution=resolution, input_range="0_1")
    cfg = GlobalPercConfig(
        start_weight=1.0,
        end_weight=2.0,
        curve_force=3,
        modules_to_hook=[nn.Linear, nn.Conv2d, nn.ReLU, nn.GELU, GELUActivation],
        loss_func=NormalizedTensorLoss("l2"),
    )
    g = torch.Generator().manual_seed(1)
    target = torch.rand(1, 3, resolution, resolution, generator=g)
    base = torch.rand(1, 3, resolution, resolution, generator=g)
    if variant == "ours":
        loss_obj = GlobalPercLoss(model, cfg)
        fn = loss_obj
        hooks = loss_obj.num_hooks
    else:
        model.requires_grad_(False).eval()

        def fn(p, t):
            return naive_loss(model, cfg, p, t)

        hooks = sum(isinstance(m, tuple(cfg.modules_to_hook)) for m in model.modules())
    times, mems = [], []
    for _ in range(iters + 1):  # first iteration is warm-up (allocator, lazy init), not reported
        pred = base.clone().requires_grad_(True)
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            loss = fn(pred, target)
            loss.backward()
        times.append(time.perf_counter() - t0)
        mems.append(mem.extra_mb)
        value, grad_norm = float(loss.detach()), float(pred.grad.norm())
        del loss, pred
    return {
        "variant": variant,
        "hooks": hooks,
        "loss": value,
        "grad_norm": grad_norm,
        "time_s": statistics.median(times[1:]),
        "peak_extra_mb": statistics.median(mems[1:]),
        "times": times[1:],
        "mems": mems[1:],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--iters", type=int, default=3, help="Measured iterations per variant (after one warm-up)."
    )
    p.add_argument("--resolution", type=int, default=504, help="Input side (multiple of 14).")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads in each worker.")
    p.add_argument("--worker", choices=["ours", "naive"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.resolution, args.iters, args.threads)))
        return
    results = {}
    for variant in ("naive", "ours"):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            variant,
            "--iters",
            str(args.iters),
            "--resolution",
            str(args.resolution),
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"worker {variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    n, o = results["naive"], results["ours"]
    print(
        f"DINOv2 ViT-S/14 (random weights), {args.resolution}px, batch 1, {o['hooks']} hooks, "
        f"{args.threads} threads, forward+backward, median of {args.iters}"
    )
    print(f"{'variant':<8} {'loss':>14} {'|grad|':>12} {'time s':>8} {'peak extra MB':>14}")
    for r in (n, o):
        print(
            f"{r['variant']:<8} {r['loss']:>14.8f} {r['grad_norm']:>12.6e} {r['time_s']:>8.3f} "
            f"{r['peak_extra_mb']:>14.1f}"
        )
    rel = abs(o["loss"] - n["loss"]) / max(abs(n["loss"]), 1e-12)
    print(
        f"loss relative difference: {rel:.2e}; grad-norm relative difference: "
        f"{abs(o['grad_norm'] - n['grad_norm']) / max(n['grad_norm'], 1e-12):.2e}"
    )
    print(
        f"ours/naive: time {o['time_s'] / n['time_s']:.3f}x, peak memory {o['peak_extra_mb'] / n['peak_extra_mb']:.3f}x"
    )


if __name__ == "__main__":
    main()
