"""DinoVQ replica (seed 001): does the DINO-feature loss make the tokens more semantic at similar PSNR?

    python script/replicas/dinovq.py --assets .cache/trained --out outputs/replicas/dinovq --seeds 0 1 2
    python script/replicas/dinovq.py --quick --out outputs/replicas/dinovq_quick    # the CI guard's scale

The repo's trainer (train/dinovq/train.py, config configs/dinovq_replica_digits.yaml) trains the tokenizer on
the digits' train split (1,497 images, scikit-learn's load_digits upsampled to 64 px, resized to 28 px
with random crops and flips, the trainer's augmentation)
under three conditions that differ only in the loss, with the same seeds and steps:

    recon        pixel MSE + VQ commitment (model.dino_loss_weight 0)
    recon+dino   + the DINO-feature loss against the trained tiny14 "DINOv2" stand-in (weight 1, the seed's)
    recon+gan    pixel MSE + VQ + PatchGAN (adaptive weight, from model.disc_start), no DINO term

(LPIPS needs VGG16's ImageNet weights, which are not available offline; the LPIPS condition is left out.)
Every run is then measured on the held-out test split (300 digits) with the trainer's own evaluation (PSNR,
SSIM, codebook usage and perplexity) and a linear probe of its quantised token features on the digit
classes: logistic regression (scikit-learn) fitted on the train split's tokens, accuracy on the test split's,
for the flattened token map (the tokens as a downstream model receives them) and the mean-pooled token
(position removed: only what the codes themselves carry). The untrained tokenizer (same seed, step 0) is the
reference every trained number must beat.

Writes under --out: runs/<condition>-seed<k>/ (the trainer's outputs), results.json, results.csv,
table.md, learning_curves.png, reconstructions.png.

--quick: one seed, two conditions (recon, recon+dino), a smaller tokenizer (7 px patches, DINO at 28 px) and a short run on the
tiny random assets (.cache/tiny: no trained assets needed) with digits written under --out; it only shows
that the loop learns (tests/replicas/test_dinovq_replica.py asserts it).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import time
from dataclasses import dataclass
from typing import Any

from script.replicas.summary import (
    REPO_ROOT,
    fmt_mean_std,
    load_main,
    machine_line,
    markdown_table,
    mean_std,
    read_jsonl,
    write_csv,
    write_json,
)
from utils.cli import UserError, run_cli

CONFIG = REPO_ROOT / "configs" / "dinovq_replica_digits.yaml"
CONDITIONS: dict[str, list[str]] = {
    "recon": ["model.dino_loss_weight=0.0", "model.use_gan=false"],
    "recon+dino": ["model.dino_loss_weight=1.0", "model.use_gan=false"],
    "recon+gan": ["model.dino_loss_weight=0.0", "model.use_gan=true"],
}
PROBE_FEATURES = ("probe_tokens", "probe_pooled")


@dataclass(frozen=True)
class Scale:
    """Everything the full and the quick mode set differently (the rest is the config file's)."""

    steps: int
    eval_every: int
    overrides: tuple[str, ...] = ()
    conditions: tuple[str, ...] = tuple(CONDITIONS)
    probe_train: int | None = None  # None: every train image
    probe_test: int | None = None


FULL = Scale(steps=300, eval_every=50)
QUICK = Scale(
    steps=60,
    eval_every=30,
    overrides=(
        "model.patch_size=7",
        "model.encoder_embed_dim=32",
        "model.encoder_depth=1",
        "model.decoder_depth=1",
        "model.num_heads=2",
        "model.codebook_size=32",
        "dino.resolution=28",
        "train.batch_size=16",
        "train.warmup_steps=5",
        "eval.max_images=64",
    ),
    conditions=("recon", "recon+dino"),
    probe_train=300,
    probe_test=100,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--assets",
        type=Path,
        default=None,
        help="Trained assets root (preprocessing/trained_assets.py --out; holds data/digits and dinov2/). "
        "Required without --quick; --quick defaults to the random tiny assets in .cache/tiny.",
    )
    p.add_argument("--out", type=Path, default=Path("outputs/replicas/dinovq"), help="Output directory.")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="Training seeds (>= 3 for a table)."
    )
    p.add_argument(
        "--steps", type=int, default=None, help="Optimizer steps per run (default: 300; quick 60)."
    )
    p.add_argument("--quick", action="store_true", help="CI scale (see above): shows learning, nothing more.")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared machine a second thread mostly spins against other jobs).",
    )
    return p


def resolve_assets(args: argparse.Namespace) -> tuple[Path, Path]:
    """(digits root with train/ and test/, official-layout tiny14 DINOv2 .pth)."""
    if args.assets is not None:
        from preprocessing.trained_assets import STAMP_NAME, asset_paths

        paths = asset_paths(args.assets)
        if not paths["stamp"].is_file():
            raise UserError(
                f"{args.assets} holds no {STAMP_NAME}: build the trained assets first "
                f"(python preprocessing/trained_assets.py --out {args.assets}), or use --quick"
            )
        return paths["digits"], paths["dinov2_official"]
    if not args.quick:
        raise UserError("--assets is required without --quick (python preprocessing/trained_assets.py)")
    from preprocessing.digits import write_digits
    from preprocessing.make_tiny_assets import ensure_tiny_assets

    tiny = ensure_tiny_assets(REPO_ROOT / ".cache" / "tiny")
    digits = args.out / "data" / "digits"
    if not (digits / "test").is_dir():
        write_digits(digits, size=64)
    return digits, tiny["dinov2_official"]


def train_run(run_dir: Path, condition: str, seed: int, scale: Scale, digits: Path, dino: Path) -> None:
    argv = [
        "--config",
        str(CONFIG),
        "--output_dir",
        str(run_dir),
        "--overwrite_output_dir",
        "--max_steps",
        str(scale.steps),
        "--set",
        f"data.train_dir={digits / 'train'}",
        f"data.val_dir={digits / 'test'}",
        f"dino.source={dino}",
        f"train.seed={seed}",
        f"train.eval_every={scale.eval_every}",
        f"train.checkpointing_steps={scale.steps}",
        f"model.disc_start={scale.steps // 4}",
        *CONDITIONS[condition],
        *scale.overrides,
    ]
    load_main("train/dinovq/train.py")(argv)


def load_tokenizer(run_dir: Path, seed: int, trained: bool):
    """The run's tokenizer: its final checkpoint, or (trained=False) a fresh one built with the same seed."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from models.dinovq import DinoVQModel

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    torch.manual_seed(seed)
    model = DinoVQModel(**cfg["model"])
    if trained:
        ckpts = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        if not ckpts:
            raise FileNotFoundError(f"{run_dir} has no checkpoint-*")
        model.load_state_dict(load_file(str(ckpts[-1] / "model.safetensors")))
    return model.eval()


def labelled_items(root: Path, limit: int | None) -> tuple[list[tuple[str, Path]], list[int]]:
    """(id, path) of the ImageFolder split and the class labels (folder names); every k-th when limited."""
    from train.dinovq.data import find_images

    items = find_images(root)
    if limit is not None and limit < len(items):
        step = len(items) / limit
        items = [items[int(i * step)] for i in range(limit)]
    return items, [int(p.parent.name) for _, p in items]


def token_features(model, items, batch_size: int = 64):
    """Quantised token features of the images (center crop): flattened [N, T*D] and mean-pooled [N, D]."""
    import torch

    from train.dinovq.data import ImageDataset

    ds = ImageDataset(items, model.img_size, augment=False)
    flat, pooled = [], []
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            imgs = torch.stack([ds[j]["image"] for j in range(i, min(i + batch_size, len(ds)))])
            z_q, _, _ = model.encode(imgs, freeze_codebook=True)
            flat.append(z_q.flatten(1))
            pooled.append(z_q.mean(1))
    return torch.cat(flat).numpy(), torch.cat(pooled).numpy()


def linear_probe(train_x, train_y, test_x, test_y) -> float:
    """Test accuracy of a standardised multinomial logistic regression (C = 1, scikit-learn defaults)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def measure(model, digits: Path, scale: Scale) -> dict[str, float]:
    """PSNR / SSIM / codebook statistics (the trainer's evaluation) and the two probes, on the test split."""
    from torch.utils.data import DataLoader

    from train.dinovq.data import ImageDataset, find_images
    from train.dinovq.evaluate import evaluate_reconstruction

    test_items = find_images(digits / "test")
    loader = DataLoader(ImageDataset(test_items, model.img_size, augment=False), batch_size=64)
    metrics, _ = evaluate_reconstruction(model, loader, model.codebook_size, max_images=None)
    train_items, train_y = labelled_items(digits / "train", scale.probe_train)
    probe_items, probe_y = labelled_items(digits / "test", scale.probe_test)
    tr_flat, tr_pool = token_features(model, train_items)
    te_flat, te_pool = token_features(model, probe_items)
    metrics["probe_tokens"] = linear_probe(tr_flat, train_y, te_flat, probe_y)
    metrics["probe_pooled"] = linear_probe(tr_pool, train_y, te_pool, probe_y)
    return metrics


def reconstruction_grid(models: dict[str, Any], digits: Path, path: Path, note: str) -> None:
    import torch

    from train.dinovq.data import ImageDataset
    from utils.figures import save_labelled_grid

    items, _ = labelled_items(digits / "test", 10)
    first = next(iter(models.values()))
    ds = ImageDataset(items, first.img_size, augment=False)
    imgs = torch.stack([ds[i]["image"] for i in range(len(ds))])
    rows, labels = [imgs], ["held-out"]
    for name, model in models.items():
        rows.append(model.reconstruct(imgs)[0].clamp(-1, 1))
        labels.append(name)
    save_labelled_grid(
        torch.cat(rows),
        path,
        ncols=len(imgs),
        row_labels=labels,
        title="DinoVQ on digits: held-out images and reconstructions (seed of the first run)",
        note=note,
    )


def curves(out: Path, runs: list[dict], conditions: tuple[str, ...], note: str) -> None:
    """recon loss (train) and PSNR / codebook usage (held-out) vs step, mean over seeds per condition."""
    from utils.figures import plot_metric_vs_step

    points: list[dict] = []
    for cond in conditions:
        by_step: dict[int, dict[str, list[float]]] = {}
        for run in (r for r in runs if r["condition"] == cond):
            for row in read_jsonl(Path(run["run_dir"]) / "losses.jsonl"):
                by_step.setdefault(row["step"], {}).setdefault("recon_loss", []).append(row["recon_loss"])
            for row in read_jsonl(Path(run["run_dir"]) / "eval_log.jsonl"):
                for k in ("psnr", "codebook_usage"):
                    by_step.setdefault(row["step"], {}).setdefault(k, []).append(row[k])
        for step, vals in sorted(by_step.items()):
            points.append({"run": cond, "step": step, **{k: mean_std(v)[0] for k, v in vals.items()}})
    plot_metric_vs_step(
        points,
        out / "learning_curves.png",
        ("recon_loss", "psnr", "codebook_usage"),
        "DinoVQ on digits: mean over seeds",
        note,
    )


def verdict(rows: dict[str, dict[str, list[float]]]) -> str:
    """The claim, judged by a rule fixed before the runs: per seed, recon+dino minus recon."""
    if "recon+dino" not in rows or "recon" not in rows:
        return "not judged (needs recon and recon+dino)"
    d, r = rows["recon+dino"], rows["recon"]
    lines = []
    for key in PROBE_FEATURES:
        deltas = [a - b for a, b in zip(d[key], r[key])]
        m, s = mean_std(deltas)
        lines.append(
            f"{key}: recon+dino - recon = {m:+.3f} ± {s:.3f} (per seed {', '.join(f'{x:+.3f}' for x in deltas)})"
        )
    dpsnr = [a - b for a, b in zip(d["psnr"], r["psnr"])]
    m_psnr = mean_std(dpsnr)[0]
    more_semantic = all(all(a > b for a, b in zip(d[key], r[key])) for key in PROBE_FEATURES)
    similar = abs(m_psnr) <= 1.0
    lines.append(f"PSNR: recon+dino - recon = {m_psnr:+.2f} dB")
    if more_semantic and similar:
        lines.append(
            "The paper's effect appears: higher probe accuracy on every seed and probe, PSNR within 1 dB."
        )
    elif more_semantic:
        lines.append("Probe accuracy rises on every seed and probe, but PSNR differs by more than 1 dB.")
    else:
        lines.append("The paper's effect does not appear on every seed and probe at this scale.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    scale = QUICK if args.quick else FULL
    if args.steps is not None:
        scale = Scale(**{**scale.__dict__, "steps": args.steps, "eval_every": max(1, args.steps // 4)})
    digits, dino = resolve_assets(args)
    out = args.out
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    untrained: list[dict[str, float]] = []
    grid_models: dict[str, Any] = {}
    for seed in args.seeds:
        for cond in scale.conditions:
            run_dir = out / "runs" / f"{cond}-seed{seed}"
            t0 = time.perf_counter()
            train_run(run_dir, cond, seed, scale, digits, dino)
            model = load_tokenizer(run_dir, seed, trained=True)
            metrics = measure(model, digits, scale)
            losses = read_jsonl(run_dir / "losses.jsonl")
            runs.append(
                {
                    "condition": cond,
                    "seed": seed,
                    "run_dir": str(run_dir),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "recon_loss_first": losses[0]["recon_loss"],
                    "recon_loss_last": losses[-1]["recon_loss"],
                    "dino_loss_first": losses[0]["dino_loss"],
                    "dino_loss_last": losses[-1]["dino_loss"],
                    **metrics,
                }
            )
            print(f"[dinovq] {cond} seed {seed}: {metrics} ({runs[-1]['seconds']} s)", flush=True)
            if seed == args.seeds[0]:
                grid_models[cond] = model
        # the untrained tokenizer of this seed (the trainer seeds before building the model; so does this)
        base = load_tokenizer(out / "runs" / f"{scale.conditions[0]}-seed{seed}", seed, trained=False)
        untrained.append({"seed": seed, **measure(base, digits, scale)})
        if seed == args.seeds[0]:
            grid_models = {"untrained": base, **grid_models}

    keys = ("psnr", "ssim", "codebook_usage", "codebook_perplexity", *PROBE_FEATURES)
    by_cond: dict[str, dict[str, list[float]]] = {"untrained": {k: [u[k] for u in untrained] for k in keys}}
    for cond in scale.conditions:
        by_cond[cond] = {k: [r[k] for r in runs if r["condition"] == cond] for k in keys}
    note = "quick mode: CI-scale run, numbers show learning only" if args.quick else ""
    header = [
        "condition",
        "PSNR (dB)",
        "SSIM",
        "codebook usage",
        "perplexity",
        "probe, tokens",
        "probe, pooled",
    ]
    table = markdown_table(
        header,
        [
            [cond, *(fmt_mean_std(v[k], 2 if k in ("psnr", "codebook_perplexity") else 3) for k in keys)]
            for cond, v in by_cond.items()
        ],
    )
    judged = verdict(by_cond)
    wall = round(time.perf_counter() - start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(
        f"Mean ± std over seeds {args.seeds}, {scale.steps} steps, held-out test split (300 digits).\n\n"
        + table
        + "\n"
        + judged.replace("\n", "  \n")
        + "\n"
    )
    write_csv(out / "results.csv", [*({"condition": "untrained", **u} for u in untrained), *runs])
    result = {
        "replica": "dinovq",
        "seeds": args.seeds,
        "steps": scale.steps,
        "quick": args.quick,
        "runs": runs,
        "untrained": untrained,
        "summary": {c: {k: mean_std(v[k]) for k in keys} for c, v in by_cond.items()},
        "verdict": judged,
        "wall_seconds": wall,
        "machine": machine_line(),
        "command": "python script/replicas/dinovq.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_json(out / "results.json", result)
    curves(out, runs, scale.conditions, note)
    reconstruction_grid(grid_models, digits, out / "reconstructions.png", note)
    print(table + "\n" + judged + f"\nwall time {wall:.0f} s -> {out}", flush=True)
    return result


if __name__ == "__main__":
    run_cli(main)
