"""Uniform per-class sampling of ImageNet into a CSV (`id,img_path,class_id,synset`).

    python preprocessing/sample_imagenet_subset.py --imagenet_root /data/imagenet --per_class 200 \\
        --out data/train_200k.csv            # 1000 x 200 (U-REPA setting A)
    python preprocessing/sample_imagenet_subset.py --imagenet_root /data/imagenet --per_class 500 \\
        --out data/train_500k.csv            # 1000 x 500 (setting B)

Layout: `<imagenet_root>/ILSVRC/Data/CLS-LOC/<split>/<synset>/*.JPEG` (Kaggle / ILSVRC); `--imagenet_root` may
also point at `CLS-LOC` or at the split folder itself. Class ids come from the class-index JSON (standard
ImageNet-1k order, datasets/imagenet_classes.json); every class of that JSON is sampled.

Deterministic: each class draws with its own RNG seeded by (`--seed`, synset), so the picks of one class do not
depend on which other classes exist. A class with fewer than `--per_class` images is logged and skipped (listed in
the summary and in `<out>.skipped.txt`). `id` is the image file stem (unique across ImageNet train and val);
`img_path` is absolute unless `--relative_to` is given (then relative to that directory; the cache builders take
it back with `--image_root`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import csv
import hashlib
import json
import os
import random

from datasets.sample_csv import CSV_COLUMNS
from utils.checkpoint import atomic_write
from utils.cli import UserError, run_cli
from utils.images import IMAGE_EXTENSIONS
from utils.logging import get_logger, progress

logger = get_logger("sample_imagenet_subset")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CLASS_INDEX = REPO_ROOT / "datasets" / "imagenet_classes.json"


def load_class_index(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``[(synset, name), ...]`` in class-id order from a ``{"0": ["n01440764", "tench"], ...}`` JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class index JSON not found: {path}")
    with open(path) as f:
        raw = json.load(f)
    try:
        ids = sorted(int(k) for k in raw)
    except ValueError as err:
        raise ValueError(f"{path}: keys must be class ids '0', '1', ...: {err}") from err
    if ids != list(range(len(ids))):
        raise ValueError(f"{path}: class ids must be 0..{len(ids) - 1} without gaps")
    out = []
    for i in ids:
        entry = raw[str(i)]
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            raise ValueError(f'{path}: entry "{i}" must be ["<synset>", "<class name>"], got {entry!r}')
        out.append((entry[0], entry[1]))
    synsets = [s for s, _ in out]
    if len(set(synsets)) != len(synsets):
        raise ValueError(f"{path}: synsets are not unique")
    return out


def find_split_dir(imagenet_root: str | os.PathLike, split: str) -> Path:
    root = Path(imagenet_root)
    for candidate in (
        root / "ILSVRC" / "Data" / "CLS-LOC" / split,
        root / "Data" / "CLS-LOC" / split,
        root / split,
    ):
        if candidate.is_dir():
            return candidate
    if root.is_dir() and any(p.is_dir() and p.name.startswith("n") for p in root.iterdir()):
        return root  # already the split folder
    raise FileNotFoundError(
        f"no ImageNet {split!r} folder under {root}: expected {root}/ILSVRC/Data/CLS-LOC/{split}/<synset>/*.JPEG"
    )


def list_class_images(class_dir: Path) -> list[Path]:
    with os.scandir(class_dir) as it:
        files = [Path(e.path) for e in it if e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files)


def _class_rng(seed: int, synset: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{synset}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def sample_subset(
    split_dir: Path,
    classes: list[tuple[str, str]],
    per_class: int,
    seed: int = 0,
    relative_to: Path | None = None,
) -> tuple[list[dict[str, str | int]], dict[str, str]]:
    """Rows of the CSV and ``{synset: reason}`` of skipped classes."""
    if per_class < 1:
        raise ValueError(f"--per_class must be >= 1, got {per_class}")
    rows: list[dict[str, str | int]] = []
    skipped: dict[str, str] = {}
    for class_id, (synset, name) in enumerate(progress(classes, desc="classes", unit="class")):
        class_dir = split_dir / synset
        if not class_dir.is_dir():
            skipped[synset] = f"class {class_id} ({name}): folder {class_dir} missing"
            continue
        files = list_class_images(class_dir)
        if len(files) < per_class:
            skipped[synset] = f"class {class_id} ({name}): {len(files)} images < --per_class {per_class}"
            continue
        picks = sorted(_class_rng(seed, synset).sample(files, per_class))
        for f in picks:
            path = os.path.relpath(f, relative_to) if relative_to else str(f.absolute())
            rows.append({"id": f.stem, "img_path": path, "class_id": class_id, "synset": synset})
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        seen, dups = set(), []
        for i in ids:
            if i in seen:
                dups.append(i)
            seen.add(i)
        raise ValueError(f"image ids (file stems) are not unique, e.g. {dups[:5]}; rename the files")
    return rows, skipped


def write_csv(rows: list[dict[str, str | int]], path: str | os.PathLike) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def skipped_summary(
    skipped: dict[str, str], num_classes: int, args: argparse.Namespace, split_dir: Path, listing: Path
) -> str:
    """One line for the skipped classes (a partial ImageNet would otherwise log ~1000 lines)."""
    no_folder = sum("missing" in reason for reason in skipped.values())
    line = (
        f"skipped {len(skipped)} of {num_classes} classes of {args.class_index_json}: {no_folder} have no folder "
        f"in {split_dir}, {len(skipped) - no_folder} have fewer than {args.per_class} images; all listed in "
        f"{listing}; e.g. {'; '.join(list(skipped.values())[:3])}"
    )
    if no_folder > num_classes // 2 and args.class_index_json == str(DEFAULT_CLASS_INDEX):
        line += ". A partial ImageNet? Pass --class_index_json with only its classes to number them 0..K-1."
    return line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--imagenet_root", required=True, help="ImageNet root (containing ILSVRC/Data/CLS-LOC)."
    )
    parser.add_argument("--split", default="train", help="Split folder to sample from (train or val).")
    parser.add_argument(
        "--per_class", type=int, required=True, help="Images per class (200 -> 200k, 500 -> 500k)."
    )
    parser.add_argument(
        "--out", default=None, help="Output CSV (default: train_<N>k.csv in the current directory)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (same seed -> same CSV).")
    parser.add_argument(
        "--class_index_json",
        default=str(DEFAULT_CLASS_INDEX),
        help="Class index JSON {'<id>': [synset, name]} fixing class ids (default: the repo's 1000 classes).",
    )
    parser.add_argument(
        "--relative_to",
        default=None,
        help="Write img_path relative to this directory (then pass it as --image_root to the cache builders).",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    classes = load_class_index(args.class_index_json)
    split_dir = find_split_dir(args.imagenet_root, args.split)
    on_disk = {p.name for p in split_dir.iterdir() if p.is_dir()}
    unknown = sorted(on_disk - {s for s, _ in classes})
    if unknown:
        logger.warning(
            "%d class folders in %s are not in %s and are ignored: %s",
            len(unknown),
            split_dir,
            args.class_index_json,
            unknown[:10],
        )
    relative_to = Path(args.relative_to).absolute() if args.relative_to else None
    rows, skipped = sample_subset(split_dir, classes, args.per_class, args.seed, relative_to)
    if not rows:
        raise UserError(
            f"no class of {args.class_index_json} has {args.per_class} images in {split_dir}"
            + (f" (e.g. {next(iter(skipped.values()))})" if skipped else "")
        )
    total = len(rows)
    out = (
        Path(args.out)
        if args.out
        else Path(f"{args.split}_{total // 1000}k.csv" if total % 1000 == 0 else f"{args.split}_{total}.csv")
    )
    write_csv(rows, out)
    skipped_file = out.with_name(out.name + ".skipped.txt")
    if skipped:
        with atomic_write(skipped_file) as tmp:
            tmp.write_text("".join(f"{s}\t{r}\n" for s, r in skipped.items()))
    elif skipped_file.exists():
        skipped_file.unlink()
    if skipped:
        logger.warning(skipped_summary(skipped, len(classes), args, split_dir, skipped_file))
    used = len(classes) - len(skipped)
    print(
        f"wrote {out}: {total} images = {used} classes x {args.per_class} (seed {args.seed}); "
        f"skipped {len(skipped)} classes" + (f" (listed in {skipped_file})" if skipped else "")
    )
    return out


if __name__ == "__main__":
    run_cli(main)
