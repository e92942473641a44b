"""Anomaly demo pictures a person can judge: the generated triplets, labelled, and mask extraction on synthetic
fg images whose true masks are known (IoU printed).

    python script/demo_anomaly_figures.py --gen_dir outputs/demo/anomaly/generate_data/hazelnut \
        --defect hole --mvtec_root .cache/tiny/mvtec --out outputs/demo/anomaly/figures

The demo's tiny SD-1.5 has random weights and trains a few steps, so its fg branch draws noise, not a defect
on black, and the masks extracted from that noise are (almost) all white. Mask extraction itself
(models/mask_extraction.py) is shown where it can be judged: on fg = image x true mask of the synthetic MVTec
defects, the input the fg branch is trained to produce.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

import numpy as np
from PIL import Image

from datasets.mvtec import defect_images, list_defects, mask_path_for
from models.mask_extraction import MaskParams, extract_mask, mask_iou, mask_to_image
from utils.cli import raise_if_problems, run_cli
from utils.figures import save_labelled_grid
from utils.images import list_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gen_dir", required=True, help="<output_root>/<class> of eval/generate.py")
    p.add_argument("--defect", required=True, help="stage-2 defect folder under --gen_dir (image/fg/mask)")
    p.add_argument(
        "--mvtec_root", required=True, help="MVTec AD root with ground_truth masks (synthetic one)"
    )
    p.add_argument("--out", required=True, help="where the two PNG figures go")
    p.add_argument("--rows", type=int, default=4, help="samples shown per figure")
    p.add_argument(
        "--note",
        default="tiny random-weight SD-1.5 trained a few steps — pictures are noise by design",
        help="figure note on the generated triplets (what the base model is)",
    )
    return p.parse_args(argv)


def generated_triplets_figure(gen_dir: Path, defect: str, out: Path, rows: int, note: str = "") -> float:
    """Labelled grid of stage-1 images and stage-2 (image, fg, mask); returns the masks' white fraction."""
    full = list_images(gen_dir / "full") if (gen_dir / "full").is_dir() else []
    parts = {k: list_images(gen_dir / defect / k) for k in ("image", "fg", "mask")}
    n = min(rows, len(parts["mask"]))
    cells, labels = [], []
    for i in range(n):
        row = [Image.open(full[i]).convert("RGB")] if full else []
        row += [Image.open(parts[k][i]).convert("RGB") for k in ("image", "fg", "mask")]
        cells += row
        labels.append(f"sample {i}")
    white = float(np.mean([np.asarray(Image.open(p)) > 127 for p in parts["mask"]]))
    cols = (["stage 1: normal"] if full else []) + ["stage 2: image", "stage 2: fg", "mask from fg"]
    save_labelled_grid(
        cells,
        out,
        ncols=len(cols),
        row_labels=labels,
        col_labels=cols,
        title=f"Generated {gen_dir.name}/{defect}: masks {white:.0%} foreground",
        note=note,
    )
    return white


def synthetic_mask_figure(mvtec_root: Path, class_name: str, out: Path, rows: int) -> dict[str, float]:
    """Mask extraction on the fg the stage-2 trainer sees by default (the image inside the true mask, the
    references' grey background outside it) of every synthetic defect; mean IoU per defect type."""
    ious: dict[str, list[float]] = {}
    cells, labels = [], []
    defects = list_defects(mvtec_root, class_name)
    shown_per_defect = max(1, rows // max(1, len(defects)))
    for defect in defects:
        for k, path in enumerate(defect_images(mvtec_root, class_name, defect)):
            image = np.asarray(Image.open(path).convert("RGB"))
            truth = np.asarray(Image.open(mask_path_for(path)).convert("L")) > 127
            fg = np.where(truth[..., None], image, 128).astype(np.uint8)  # grey = 0 in [-1, 1]
            pred = extract_mask(fg, MaskParams(background="grey"))
            iou = mask_iou(pred, truth)
            ious.setdefault(defect, []).append(iou)
            if k < shown_per_defect:
                cells += [Image.fromarray(fg), mask_to_image(truth), mask_to_image(pred)]
                labels.append(f"{defect} {path.stem}\nIoU {iou:.2f}")
    mean = {d: float(np.mean(v)) for d, v in ious.items()}
    save_labelled_grid(
        cells,
        out,
        ncols=3,
        row_labels=labels,
        col_labels=["fg: image in the true mask, grey elsewhere", "true mask", "extracted mask"],
        title=f"Mask extraction on synthetic {class_name} defects: mean IoU "
        + ", ".join(f"{d} {v:.2f}" for d, v in mean.items()),
    )
    return mean


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    gen_dir, out = Path(args.gen_dir), Path(args.out)
    problems = [
        f"{gen_dir / args.defect / k} does not exist (run eval/generate.py stage2 first)"
        for k in ("image", "fg", "mask")
        if not (gen_dir / args.defect / k).is_dir()
    ]
    if not (Path(args.mvtec_root) / gen_dir.name).is_dir():
        problems.append(f"--mvtec_root {args.mvtec_root} has no class folder {gen_dir.name}/")
    raise_if_problems(problems)
    white = generated_triplets_figure(
        gen_dir, args.defect, out / "generated_triplets.png", args.rows, note=args.note
    )
    print(
        f"[masks] generated masks are {white:.0%} foreground: the tiny model's fg branch draws noise, not a "
        f"defect on black -> {out / 'generated_triplets.png'}"
    )
    mean = synthetic_mask_figure(Path(args.mvtec_root), gen_dir.name, out / "mask_extraction.png", args.rows)
    print(
        "[masks] extraction on synthetic fg with known masks, mean IoU: "
        + ", ".join(f"{d} {v:.2f}" for d, v in mean.items())
        + f" -> {out / 'mask_extraction.png'}"
    )
    return mean


if __name__ == "__main__":
    run_cli(main)
