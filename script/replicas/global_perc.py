"""GlobalPercLoss replica (seed 002) at CPU scale: an autoencoder trained with MSE vs MSE + GlobalPercLoss over the
stand-in DINOv2, and the latent DINO head's agreement with the encoder.

    python script/replicas/global_perc.py --assets .cache/trained --out outputs/replicas/global_perc --seeds 0 1 2
    python script/replicas/global_perc.py --quick      # CI guard, <= 60 s: random tiny assets, a few steps

Part A, autoencoder. A small autoencoder in SD's `AutoencoderKL` layout (`preprocessing/tiny_sd15.build_tiny_vae`,
random init per seed, used deterministically: decode(encode(x).mean)) is trained on the scikit-learn digits
(64 px) with the same seed, data order and steps in two arms:
  - `mse`:  L = MSE(x_hat, x)
  - `mse+gp`: L = MSE(x_hat, x) + 1.0 * GlobalPercLoss(x_hat, x) over the stand-in DINOv2 (`losses/global_perc.py`
    with the seed's configuration: start 1, end 2, curve force 3, Linear/Conv2d/ReLU/GELU hooks,
    NormalizedTensorLoss("l2")).
Held-out metrics (the 300 test digits): PSNR; DINO feature distance (mean 1 - cos of the stand-in DINOv2's final
patch tokens of x_hat vs x, the network the loss uses); and, in a feature space no arm trains on, the digit
classifier (`models/digit_classifier.py`): mean L2 distance of its 64-d features of x_hat vs x and its accuracy
on the reconstructions.

Part B, latent DINO head (`train/latent_dino_head/train.py`, run as is): distilled on the training digits against
the stand-in DINOv2, from the stand-in SD VAE's latents. Agreement with the encoder on held-out digits: mean
cosine and MSE between the student's final patch tokens (from latents) and the encoder's (from pixels), and the
same for the CLS token, trained head vs an untrained head (fresh, seeded with the run seed).

Results under --out: `results.json`, `results.csv`, `summary.md` (mean +- std over seeds), `curves.png`
(held-out metrics vs step), `reconstructions.png` (held-out digits, both arms, seed 0).
`--quick` runs both parts on the random tiny assets for a few steps (no classifier metrics): the CI guard
`tests/replicas/test_global_perc_replica.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import csv
import dataclasses
import json
import os
import platform
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from script.replicas.summary import resolve_replica_assets
from utils.cli import UserError, run_cli
from utils.logging import get_logger

logger = get_logger("replica_global_perc")
REPO_ROOT = Path(__file__).resolve().parents[2]
ARMS = {"mse": "MSE", "mse+gp": "MSE + GlobalPercLoss"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Run lengths and sizes (fixed before any comparison was looked at).

    The first full run (2026-12-06, 40 + 40 steps) was cut to what a machine at load average 20 could finish; on
    the quiet machine it took 4 min, so the run length was set to 200 + 200 steps (~ the 30 min budget) before
    the longer run was made, for the budget's sake alone."""

    ae_steps: int = 200
    ae_eval_every: int = 20
    ae_batch: int = 16
    ae_lr: float = 2e-3
    perc_weight: float = 1.0
    head_steps: int = 200
    head_batch: int = 16
    head_lr: float = 1e-3
    train_limit: int | None = None  # digits used (None: all 1,497 train / 300 test)
    test_limit: int | None = None


FULL = Settings()
QUICK = Settings(
    ae_steps=25, ae_eval_every=25, ae_batch=8, head_steps=20, head_batch=8, train_limit=100, test_limit=30
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--assets",
        default=None,
        help="Trained-asset tree of preprocessing/trained_assets.py (TRAINED_ASSETS.json in it), used read-only. "
        "Default: .cache/trained, or with --quick the random tiny assets (.cache/tiny, built if missing).",
    )
    p.add_argument(
        "--out", default="outputs/replicas/global_perc", help="Results: JSON, CSV, markdown, figures."
    )
    p.add_argument(
        "--work", default=None, help="Scratch (head runs, digits for --quick); default <out>/work."
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="Seeds, each arm runs each (default 0 1 2; quick 0).",
    )
    p.add_argument(
        "--quick", action="store_true", help="CI guard: tiny assets, few steps, no classifier metrics."
    )
    p.add_argument("--ae_steps", type=int, default=None, help="Autoencoder steps (default 40; quick 25).")
    p.add_argument("--head_steps", type=int, default=None, help="Latent-head steps (default 40; quick 20).")
    p.add_argument("--skip_head", action="store_true", help="Only part A (the autoencoder).")
    p.add_argument("--threads", type=int, default=2, help="torch threads.")
    args = p.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.ae_steps:
        s = dataclasses.replace(s, ae_steps=args.ae_steps, ae_eval_every=min(s.ae_eval_every, args.ae_steps))
    if args.head_steps:
        s = dataclasses.replace(s, head_steps=args.head_steps)
    if s.ae_steps % s.ae_eval_every:
        p.error(f"--ae_steps ({s.ae_steps}) must be a multiple of {s.ae_eval_every}")
    args.settings = s
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    return args


def load_split(digits: Path, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N,3,64,64] in [-1,1] and labels of one split of the ImageFolder digits (class-balanced prefix)."""
    from utils.images import load_rgb

    images, labels = [], []
    for d in range(10):
        files = sorted((digits / split / str(d)).glob("*.png"))
        if not files:
            raise UserError(
                f"{digits / split / str(d)}: no PNG files (expected the trained-asset digit layout)"
            )
        files = files[: max(1, limit // 10)] if limit else files
        images += [torch.from_numpy(np.array(load_rgb(f))).permute(2, 0, 1) for f in files]
        labels += [d] * len(files)
    return torch.stack(images).float() / 127.5 - 1, torch.tensor(labels)


def load_encoder(assets: dict[str, Any]):
    from models.dinov2_encoder import DINOv2Encoder

    return (
        DINOv2Encoder.from_pretrained(
            str(assets["dinov2_official"]), variant="tiny14", resolution=56, input_range="-1_1"
        )
        .eval()
        .requires_grad_(False)
    )


# ------------------------------------------------------------------------------------------------ part A
def reconstruct(ae, x: torch.Tensor) -> torch.Tensor:
    return ae.decode(ae.encode(x).latent_dist.mean).sample


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Mean over images of 10 log10(peak^2 / MSE) on [0,1] pixels."""
    mse = ((x_hat.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


@torch.no_grad()
def evaluate_ae(ae, test: torch.Tensor, labels: torch.Tensor, encoder, classifier) -> dict[str, float]:
    x_hat = torch.cat([reconstruct(ae, c) for c in test.split(100)]).clamp(-1, 1)
    tok_hat, tok = encoder(x_hat).patch_tokens, encoder(test).patch_tokens
    row = {
        "psnr": psnr(x_hat, test),
        "dino_feature_distance": float((1 - F.cosine_similarity(tok_hat, tok, dim=-1)).mean()),
    }
    if classifier is not None:
        f_hat, f = classifier.features(x_hat), classifier.features(test)
        row["classifier_feature_distance"] = float((f_hat - f).norm(dim=1).mean())
        row["classifier_accuracy"] = float((classifier.head(f_hat).argmax(1) == labels).float().mean())
    return row


def train_ae(
    arm: str, seed: int, data: dict, encoder, classifier, s: Settings
) -> tuple[list[dict], torch.Tensor]:
    """One autoencoder run; evaluated at step 0 and every ae_eval_every steps. Returns (rows, final recon)."""
    from losses.global_perc import GlobalPercConfig, GlobalPercLoss
    from preprocessing.tiny_sd15 import build_tiny_vae

    ae = build_tiny_vae(seed=seed)  # seeds itself: both arms start from the same weights
    ae.train()
    opt = torch.optim.AdamW(ae.parameters(), lr=s.ae_lr, weight_decay=0.0)
    perc = GlobalPercLoss(encoder, GlobalPercConfig()) if arm == "mse+gp" else None
    train_x = data["train_x"]
    order = torch.Generator().manual_seed(seed + 1000)  # same batches in both arms
    rows = [{"arm": arm, "seed": seed, "step": 0, **evaluate_ae(ae, *data["test"], encoder, classifier)}]
    losses = []
    for step in range(1, s.ae_steps + 1):
        idx = torch.randint(0, len(train_x), (s.ae_batch,), generator=order)
        x = train_x[idx]
        x_hat = reconstruct(ae, x)
        mse = F.mse_loss(x_hat, x)
        # the encoder checks its stated input range: an early reconstruction overshoots [-1, 1], so the
        # perceptual term sees the clamped image (the MSE term pulls overshooting pixels back)
        loss = mse + s.perc_weight * perc(x_hat.clamp(-1, 1), x) if perc is not None else mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(mse.detach()))
        if step % s.ae_eval_every == 0:
            ae.eval()
            row = evaluate_ae(ae, *data["test"], encoder, classifier)
            ae.train()
            window = losses[-min(len(losses), 10) :]
            rows.append({"arm": arm, "seed": seed, "step": step, "train_mse": float(np.mean(window)), **row})
            logger.info(json.dumps(rows[-1]))
    if perc is not None:
        perc.close()
    encoder.eval().requires_grad_(False)
    with torch.no_grad():
        ae.eval()
        final = reconstruct(ae, data["test"][0][:10]).clamp(-1, 1)
    return rows, final


# ------------------------------------------------------------------------------------------------ part B
@torch.no_grad()
def head_agreement(student, encoder, vae, test: torch.Tensor) -> dict[str, float]:
    """Student (latents) vs encoder (pixels) on held-out images: final patch tokens and CLS."""
    latents = vae.encode(test).latent_dist.mean * vae.config.scaling_factor
    t = encoder(test, return_cls=True)
    o = student(latents, return_cls=True)
    return {
        "token_cosine": float(F.cosine_similarity(o.patch_tokens, t.patch_tokens, dim=-1).mean()),
        "token_mse": float(F.mse_loss(o.patch_tokens, t.patch_tokens)),
        "cls_cosine": float(F.cosine_similarity(o.cls, t.cls, dim=-1).mean()),
    }


def run_head(seed: int, assets: dict, data: dict, work: Path, s: Settings) -> list[dict]:
    """Train the latent head with train/latent_dino_head/train.py, then compare it and its untrained init."""
    from diffusers import AutoencoderKL

    from models.latent_dino_head import LatentDINOv2, LatentPatchHead
    from train.latent_dino_head import train as head_train

    out = work / f"head_seed{seed}"
    head_file = out / head_train.HEAD_FILE
    args = [
        "--sd_path", str(assets["sd15"]), "--dino_source", str(assets["dinov2_official"]),
        "--dino_variant", "tiny14", "--resolution", "56", "--image_size", "64",
        "--data_dir", str(data["head_dir"]), "--output_dir", str(out), "--seed", str(seed),
        "--max_train_steps", str(s.head_steps), "--batch_size", str(s.head_batch), "--lr", str(s.head_lr),
        "--num_workers", "0", "--checkpointing_steps", str(s.head_steps), "--log_every", "10",
        "--hidden", "64", "--depth", "3", "--mixed_precision", "no",
    ]  # fmt: skip
    if not head_file.is_file():
        head_train.main(args)
    losses_log = out / "losses.jsonl"
    losses = (
        [json.loads(line)["loss"] for line in losses_log.read_text().splitlines()]
        if losses_log.exists()
        else []
    )
    encoder = load_encoder(assets)
    vae = AutoencoderKL.from_pretrained(assets["sd15"], subfolder="vae").eval().requires_grad_(False)
    trained = LatentDINOv2.from_head_file(encoder, head_file).eval()
    torch.manual_seed(seed)
    untrained = LatentDINOv2(
        encoder, LatentPatchHead(encoder.embed_dim, vae.config.latent_channels, hidden=64, depth=3)
    ).eval()
    test = data["test"][0]
    return [
        {"head": "untrained", "seed": seed, **head_agreement(untrained, encoder, vae, test)},
        {
            "head": "trained",
            "seed": seed,
            "steps": s.head_steps,
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None,
            **head_agreement(trained, encoder, vae, test),
        },
    ]


# ------------------------------------------------------------------------------------------------ reporting
AE_METRICS = (
    ("psnr", "held-out PSNR (dB)", "higher"),
    ("dino_feature_distance", "DINO feature distance (1 - cos)", "lower"),
    ("classifier_feature_distance", "classifier feature distance (L2)", "lower"),
    ("classifier_accuracy", "classifier accuracy on reconstructions", "higher"),
)
HEAD_METRICS = ("token_cosine", "token_mse", "cls_cosine")


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fmt(ms: tuple[float, float]) -> str:
    return f"{ms[0]:.3f} +- {ms[1]:.3f}"


def summarise(result: dict[str, Any], out: Path) -> str:
    s, seeds = result["settings"], result["seeds"]
    rows = result["ae_rows"]
    metrics = [m for m in AE_METRICS if all(m[0] in r for r in rows)]
    lines = [
        f"Mean +- std over seeds {seeds} (sample std, n = {len(seeds)}). Autoencoder: {s['ae_steps']} steps, batch "
        f"{s['ae_batch']}, AdamW lr {s['ae_lr']}, GlobalPercLoss weight {s['perc_weight']}.",
        "",
        "| arm | step | " + " | ".join(f"{name} ({better} better)" for _, name, better in metrics) + " |",
        "|" + "---|" * (len(metrics) + 2),
    ]
    for arm in ARMS:
        for step in sorted({r["step"] for r in rows if r["arm"] == arm}):
            sel = [r for r in rows if r["arm"] == arm and r["step"] == step]
            lines.append(
                f"| {ARMS[arm]} | {step} | "
                + " | ".join(fmt(mean_std([r[m] for r in sel])) for m, _, _ in metrics)
                + " |"
            )
    if result.get("head_rows"):
        hr = result["head_rows"]
        lines += [
            "",
            f"Latent DINO head ({s['head_steps']} steps, batch {s['head_batch']}, lr {s['head_lr']}): agreement with the "
            "encoder on the held-out digits (student on VAE latents vs encoder on pixels).",
            "",
            "| head | token cosine (higher better) | token MSE (lower better) | CLS cosine (higher better) |",
            "|---|---|---|---|",
        ]
        for head in ("untrained", "trained"):
            sel = [r for r in hr if r["head"] == head]
            lines.append(
                f"| {head} | " + " | ".join(fmt(mean_std([r[m] for r in sel])) for m in HEAD_METRICS) + " |"
            )
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def plot_curves(rows: list[dict], path: Path, title: str) -> Path:
    from utils.figures import _pyplot, _save

    plt = _pyplot()
    metrics = [m for m in AE_METRICS if all(m[0] in r for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    for ax, (metric, name, better) in zip(axes[0], metrics):
        for arm, label in ARMS.items():
            steps = sorted({r["step"] for r in rows if r["arm"] == arm})
            stats = [
                mean_std([r[metric] for r in rows if r["arm"] == arm and r["step"] == st]) for st in steps
            ]
            if not stats:
                continue
            mu, sd = np.array([m for m, _ in stats]), np.array([d for _, d in stats])
            ax.plot(steps, mu, marker="o", ms=3, label=label)
            ax.fill_between(steps, mu - sd, mu + sd, alpha=0.2)
        ax.set_title(f"{name}\n({better} is better)", fontsize=8)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi=90)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    s: Settings = args.settings
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    assets = resolve_replica_assets(args.assets, args.quick, work)
    logger.info(f"assets: {assets['kind']}")
    train_x, _ = load_split(assets["digits"], "train", s.train_limit)
    test = load_split(assets["digits"], "test", s.test_limit)
    data = {"train_x": train_x, "test": test, "head_dir": assets["digits"] / "train"}
    if s.train_limit:  # the head trainer reads a folder: link the subset
        data["head_dir"] = work / "head_train_subset"
        for d in range(10):
            folder = data["head_dir"] / str(d)
            folder.mkdir(parents=True, exist_ok=True)
            for f in sorted((assets["digits"] / "train" / str(d)).glob("*.png"))[
                : max(1, s.train_limit // 10)
            ]:
                if not (folder / f.name).exists():
                    os.symlink(f.resolve(), folder / f.name)
    encoder = load_encoder(assets)
    classifier = None
    if assets["classifier"] is not None:
        from models.digit_classifier import DigitClassifier

        classifier = DigitClassifier.from_pretrained(assets["classifier"])
    seconds: dict[str, float] = {}
    ae_rows: list[dict] = []
    finals: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    for seed in args.seeds:
        for arm in ARMS:
            rows, final = train_ae(arm, seed, data, encoder, classifier, s)
            ae_rows += rows
            if seed == args.seeds[0]:
                finals[arm] = final
    seconds["autoencoder"] = time.perf_counter() - t0
    head_rows: list[dict] = []
    if not args.skip_head:
        t0 = time.perf_counter()
        for seed in args.seeds:
            head_rows += run_head(seed, assets, data, work, s)
            logger.info(json.dumps(head_rows[-2:]))
        seconds["latent_head"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start
    result: dict[str, Any] = {
        "replica": "GlobalPercLoss (seed 002) on the stand-in DINOv2, scikit-learn digits",
        "assets": assets["kind"],
        "settings": dataclasses.asdict(s),
        "seeds": args.seeds,
        "ae_rows": ae_rows,
        "head_rows": head_rows,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads",
        "command": "python script/replicas/global_perc.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    cols = ["arm", "seed", "step", "train_mse"] + [
        m for m, _, _ in AE_METRICS if any(m in r for r in ae_rows)
    ]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in cols} for r in ae_rows)
    summary = summarise(result, out)
    plot_curves(ae_rows, out / "curves.png", f"GlobalPercLoss replica: {assets['kind']}, seeds {args.seeds}")
    from utils.figures import save_labelled_grid

    save_labelled_grid(
        torch.cat([test[0][:10], *finals.values()]),
        out / "reconstructions.png",
        ncols=10,
        row_labels=["held-out"] + [ARMS[a] for a in finals],
        title=f"Held-out digits and reconstructions after {s.ae_steps} steps (seed {args.seeds[0]})",
    )
    print(summary)
    logger.info(f"done in {seconds['total']:.0f} s: {out}")
    return result


if __name__ == "__main__":
    run_cli(main)
