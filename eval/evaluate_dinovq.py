"""Reconstruction benchmark of an exported DinoVQ tokenizer: rFID, PSNR, SSIM, LPIPS, codebook usage/perplexity.

    # ImageNet val, all 50,000 images (the published tokenizers' rFID protocol; see docs/dinovq.md)
    python eval/evaluate_dinovq.py --tokenizer outputs/dinovq/dinovq --data /data/imagenet \
        --protocol imagenet_val_50k --output_dir results/dinovq_val
    # any image folder (recursive; sub-folders are the classes of --per_class), 1000 images
    python eval/evaluate_dinovq.py --tokenizer DIR --data /data/my_images --num_images 1000 --per_class

Every image goes through the tokenizer's evaluation transform (shorter side resized to cover ``img_size``, PIL
bicubic, centre crop) and ``reconstruct``; the reconstruction is quantised like a saved PNG (8 bits) before
every metric. Metrics (train/dinovq/evaluate.py's definitions): PSNR on [0,1] (data range 1), SSIM (Gaussian
11x11, sigma 1.5), LPIPS-VGG (losses/lpips_vgg.py, the ``lpips`` package), codebook usage (distinct codes /
codebook size) and perplexity (exp of the code histogram's entropy), rFID = FID between the (cropped) inputs
and their reconstructions through clean-fid (eval/fid.py: clean-fid's resizer, Inception and Frechet
distance). Writes ``metrics.json`` (overall, and per class with ``--per_class``) and ``reconstructions.png``
(labelled grid: original | reconstruction); ``--save_images`` also writes both sets as PNG folders (e.g. for
another FID tool). Missing LPIPS / Inception weights are an error naming the file (or pass --no_lpips /
--no_rfid).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import csv
import json
import os
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from eval.fid import feature_stats, frechet_distance, to_uint8_range
from models.dinovq import DinoVQModel
from train.dinovq.data import resize_crop
from train.dinovq.evaluate import codebook_stats, psnr, ssim
from utils.checkpoint import atomic_write
from utils.cli import UserError, run_cli
from utils.images import IMAGE_EXTENSIONS, UnreadableImageError, pil_to_tensor, read_image, to_pil
from utils.logging import get_logger, progress

logger = get_logger("evaluate_dinovq")
IMAGENET_VAL_SIZE = 50_000
PROTOCOLS = ("none", "imagenet_val_50k")
VAL_SOLUTION = "LOC_val_solution.csv"  # Kaggle ImageNet layout: labels of the flat val folder


@dataclass(frozen=True)
class EvalItem:
    id: str  # path relative to the data folder, without extension
    path: Path
    label: str | None  # class (synset / sub-folder), None when the folder is flat and unlabelled


# ------------------------------------------------------------------------------------------------- data
def imagenet_split_dir(root: Path, split: str) -> Path | None:
    for candidate in (root / "ILSVRC" / "Data" / "CLS-LOC" / split, root / "Data" / "CLS-LOC" / split):
        if candidate.is_dir():
            return candidate
    return None


def val_solution_labels(root: Path) -> dict[str, str]:
    """``{ImageId: synset}`` from the Kaggle layout's LOC_val_solution.csv (first synset of each row)."""
    for path in (root / VAL_SOLUTION, root.parent / VAL_SOLUTION):
        if path.is_file():
            with open(path, newline="") as f:
                return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    return {}


def list_items(data: str | os.PathLike, split: str = "val") -> list[EvalItem]:
    """Images of an ImageNet root (its ``split``: ``<synset>/*.JPEG`` sub-folders or the flat official layout
    labelled by LOC_val_solution.csv) or of any folder (recursive; the first sub-folder is the class)."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root} is not a directory")
    folder = imagenet_split_dir(root, split)
    if folder is None and ((root / "ILSVRC").is_dir() or (root / "Data" / "CLS-LOC").is_dir()):
        raise UserError(f"{root} is an ImageNet root without the split folder ILSVRC/Data/CLS-LOC/{split}")
    folder = folder or root
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    solution = val_solution_labels(root) if folder != root else {}
    items = []
    for p in files:
        rel = p.relative_to(folder)
        label = rel.parts[0] if len(rel.parts) > 1 else solution.get(p.stem)
        items.append(EvalItem(rel.with_suffix("").as_posix(), p, label))
    return items


def choose_items(items: list[EvalItem], num_images: int | None, seed: int) -> list[EvalItem]:
    """All items, or ``num_images`` of them drawn without replacement (seeded), in listing order."""
    if num_images is None or num_images >= len(items):
        return items
    picks = sorted(random.Random(seed).sample(range(len(items)), num_images))
    return [items[i] for i in picks]


class EvalImages(Dataset):
    """``(index, image [3,H,W] in [-1,1] or None, reason)`` through the tokenizer's evaluation transform."""

    def __init__(self, items: list[EvalItem], size: tuple[int, int]) -> None:
        self.items, self.size = items, tuple(size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            image = read_image(self.items[index].path, "RGB")
        except UnreadableImageError as err:
            return index, None, str(err)
        return index, pil_to_tensor(resize_crop(image, self.size, None, flip=False), (-1.0, 1.0)), ""


def _collate(batch):
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, r) for i, x, r in batch if x is None]
    idx = [i for i, _ in good]
    return idx, (torch.stack([x for _, x in good]) if good else None), bad


# ----------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def evaluate_tokenizer(
    model: DinoVQModel,
    items: list[EvalItem],
    lpips_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    inception: Any = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    per_class: bool = False,
    grid_images: int = 8,
    save_images: str | os.PathLike | None = None,
) -> tuple[dict[str, Any], list[tuple[EvalItem, torch.Tensor, torch.Tensor, float]]]:
    """(results, the first ``grid_images`` (item, input, reconstruction, psnr)) over ``items``."""
    model = model.to(device).eval()
    loader = DataLoader(
        EvalImages(items, model.img_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=torch.device(device).type == "cuda",
    )
    per_image: dict[str, list[float]] = defaultdict(list)
    labels: list[str | None] = []
    codes: list[torch.Tensor] = []
    feats_real: list[np.ndarray] = []
    feats_fake: list[np.ndarray] = []
    unreadable: dict[str, str] = {}
    shown: list[tuple[EvalItem, torch.Tensor, torch.Tensor, float]] = []
    for idx, images, bad in progress(loader, desc="reconstructing", unit="batch"):
        for i, reason in bad:
            unreadable[items[i].id] = reason
            logger.warning("skipping unreadable image %s", reason)
        if images is None:
            continue
        x = images.to(device)
        rec, indices = model.reconstruct(x)
        x255, r255 = to_uint8_range(x), to_uint8_range(rec)  # inputs are 8-bit already; recon as saved PNG
        x01, r01 = x255 / 255.0, r255 / 255.0
        batch_psnr = psnr(r01, x01).cpu()
        per_image["psnr"] += batch_psnr.tolist()
        per_image["ssim"] += ssim(r01, x01).cpu().tolist()
        if lpips_fn is not None:
            per_image["lpips"] += lpips_fn(r01 * 2 - 1, x01 * 2 - 1).flatten().float().cpu().tolist()
        if inception is not None:
            feats_real.append(inception(x255, outputs=("pool",))["pool"].double().cpu().numpy())
            feats_fake.append(inception(r255, outputs=("pool",))["pool"].double().cpu().numpy())
        codes.append(indices.cpu())
        labels += [items[i].label for i in idx]
        for j, i in enumerate(idx):
            if len(shown) < grid_images:
                shown.append((items[i], x01[j].cpu(), r01[j].cpu(), float(batch_psnr[j])))
            if save_images is not None:
                for sub, img in (("inputs", x01[j]), ("reconstructions", r01[j])):
                    out = Path(save_images) / sub / f"{items[i].id}.png"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    to_pil(img, (0.0, 1.0)).save(out)
    n = len(labels)
    if n == 0:
        raise UserError(f"none of the {len(items)} images could be read")
    all_codes = torch.cat(codes)
    metrics = {k: float(np.mean(v)) for k, v in per_image.items()}
    metrics.update(codebook_stats(all_codes, model.codebook_size))
    if inception is not None:
        if n < 2:
            raise UserError("rFID needs at least 2 images (or pass --no_rfid)")
        real, fake = np.concatenate(feats_real), np.concatenate(feats_fake)
        metrics["rfid"] = frechet_distance(*feature_stats(real), *feature_stats(fake))
    results: dict[str, Any] = {"num_images": n, "num_unreadable": len(unreadable), "metrics": metrics}
    if unreadable:
        results["unreadable"] = unreadable
    if per_class:
        results["per_class"] = class_metrics(labels, per_image, all_codes, model.codebook_size)
    return results, shown


def class_metrics(
    labels: list[str | None], per_image: dict[str, list[float]], codes: torch.Tensor, codebook_size: int
) -> dict[str, dict[str, float]]:
    """Mean PSNR/SSIM/LPIPS and codebook usage/perplexity of each class (rFID is not split: a class of 50
    images gives no meaningful FID)."""
    if all(label is None for label in labels):
        raise UserError("--per_class: the images have no classes (put them in one sub-folder per class)")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label if label is not None else "(unlabelled)"].append(i)
    out = {}
    for label, idx in sorted(groups.items()):
        stats = {k: float(np.mean([v[i] for i in idx])) for k, v in per_image.items()}
        stats.update(codebook_stats(codes[idx], codebook_size))
        out[label] = {"num_images": len(idx), **stats}
    return out


def save_grid(shown, path: Path, note: str) -> Path:
    """Originals in the top row, reconstructions below; each column labelled with file, class and PSNR."""
    from utils.figures import save_labelled_grid

    images = [x for _, x, _, _ in shown] + [r for _, _, r, _ in shown]
    col_labels = [
        "\n".join(t for t in (Path(item.id).name, item.label, f"PSNR {p:.2f} dB") if t)
        for item, _, _, p in shown
    ]
    return save_labelled_grid(
        images,
        path,
        ncols=len(shown),
        row_labels=["original", "reconstruction"],
        col_labels=col_labels,
        title="DinoVQ reconstructions",
        note=note,
        value_range=(0.0, 1.0),
        cell_inches=1.6,
    )


# ------------------------------------------------------------------------------------------------------ CLI
def load_rfid_inception(path: str | None, device: str, mode: str | None):
    """clean-fid's Inception from ``path`` / the caches; ``"random"``: random weights (demo, smoke tests)."""
    import tempfile

    from eval.inception import TORCHSCRIPT_FILENAME, load_inception, write_random_torchscript_inception

    if path == "random":
        logger.warning("--inception_path random: random Inception weights, rFID values are meaningless")
        with tempfile.TemporaryDirectory() as tmp:  # loaded into memory, the file is not needed afterwards
            weights = write_random_torchscript_inception(Path(tmp) / TORCHSCRIPT_FILENAME)
            return load_inception(weights, device=device, mode=mode)
    return load_inception(path, device=device, mode=mode)  # MissingWeightsError names the file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tokenizer", required=True, help="exported tokenizer folder (config.json + model.safetensors)"
    )
    p.add_argument(
        "--data",
        required=True,
        help="an ImageNet root (uses ILSVRC/Data/CLS-LOC/<--split>) or any image folder (recursive)",
    )
    p.add_argument("--split", default="val", help="ImageNet split folder (default val)")
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="none",
        help="imagenet_val_50k: the published tokenizers' rFID set -- every image of ImageNet val, checked to "
        "be 50,000 (no subsampling); none: what --data/--num_images say",
    )
    p.add_argument(
        "--num_images", type=int, default=None, help="evaluate this many images (seeded draw); default all"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the --num_images draw")
    p.add_argument("--per_class", action="store_true", help="also metrics per class (sub-folder / synset)")
    p.add_argument("--output_dir", required=True, help="writes metrics.json and reconstructions.png here")
    p.add_argument("--save_images", action="store_true", help="also write inputs/ and reconstructions/ PNGs")
    p.add_argument("--grid_images", type=int, default=8, help="rows of the reconstruction grid")
    p.add_argument("--no_lpips", action="store_true", help="skip LPIPS (no VGG16 weights needed)")
    p.add_argument(
        "--vgg_ckpt_path", default=None, help="VGG16 backbone of LPIPS (default: torchvision cache)"
    )
    p.add_argument("--no_rfid", action="store_true", help="skip rFID (no Inception weights needed)")
    p.add_argument(
        "--inception_path",
        default=None,
        help="Inception weights for rFID (eval/inception.py; default: caches)",
    )
    p.add_argument(
        "--fid_mode",
        choices=("clean", "legacy_pytorch"),
        default=None,
        help="clean-fid mode (default: the one the Inception file serves; clean for the TorchScript file)",
    )
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=4, help="DataLoader workers decoding images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--note", default="", help="printed in the grid's title (e.g. 'random weights')")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.num_images is not None and args.num_images < 1:
        raise UserError(f"--num_images must be >= 1, got {args.num_images}")
    model = DinoVQModel.from_pretrained(args.tokenizer)
    items = list_items(args.data, args.split)
    if args.protocol == "imagenet_val_50k":
        if imagenet_split_dir(Path(args.data), args.split) is None or args.split != "val":
            raise UserError(
                "--protocol imagenet_val_50k needs --data an ImageNet root with ILSVRC/Data/CLS-LOC/val"
            )
        if len(items) != IMAGENET_VAL_SIZE or args.num_images is not None:
            raise UserError(
                f"--protocol imagenet_val_50k evaluates all {IMAGENET_VAL_SIZE:,} val images; found {len(items):,}"
                + (" and --num_images is set" if args.num_images is not None else "")
            )
    items = choose_items(items, args.num_images, args.seed)
    lpips_fn = inception = None
    if not args.no_lpips:
        from losses.lpips_vgg import build_lpips_vgg

        lpips_fn = build_lpips_vgg(args.vgg_ckpt_path, device=args.device)
    if not args.no_rfid:
        inception = load_rfid_inception(args.inception_path, args.device, args.fid_mode)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, shown = evaluate_tokenizer(
        model,
        items,
        lpips_fn=lpips_fn,
        inception=inception,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        per_class=args.per_class,
        grid_images=args.grid_images,
        save_images=out if args.save_images else None,
    )
    config = json.loads((Path(args.tokenizer) / "config.json").read_text())
    results = {
        "tokenizer": str(Path(args.tokenizer).resolve()),
        "export": config.get("export"),
        "data": str(Path(args.data).resolve()),
        "protocol": args.protocol,
        "img_size": list(model.img_size),
        "fid": None
        if inception is None
        else {"tool": "clean-fid", "mode": inception.mode, "weights": str(inception.path)},
        **results,
    }
    with atomic_write(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    if shown:
        save_grid(shown, out / "reconstructions.png", args.note)
    summary = ", ".join(f"{k}={v:.4f}" for k, v in results["metrics"].items())
    print(
        f"{results['num_images']} images: {summary}\nwritten: {out / 'metrics.json'}, {out / 'reconstructions.png'}"
    )
    return results


if __name__ == "__main__":
    run_cli(main)
