"""Stand-in foreground masks for background compensation (BCM) when no salient-object segmenter is at hand.

    python preprocessing/make_fg_masks.py --mvtec_root datasets/mvtec_ad --mvtec_name hazelnut \\
        --subsets hole good --output_dir datasets/mvtec_fg_masks

Writes ``<output_dir>/<class>/<subset>/<image file name>`` (8-bit grey, white = object) for the images of
``<class>/test/<subset>`` (``good``: ``<class>/train/good``), the layout ``--bcm_fg_mask_dir`` reads.

The reference segments with U-2-Net (a salient-object network; its weights are not available offline here).
For the paper's masks run U-2-Net instead (``u2net_test.py`` on the same folders; it writes ``<stem>.png`` at
the image's size, which ``--bcm_fg_mask_dir`` accepts). This stand-in (``--method border``) marks as object
every pixel whose colour is far from the image border's (median of the outer 2-pixel frame; threshold by
Otsu on the colour distance, Gaussian-smoothed, holes filled): adequate for MVTec's objects on uniform
backgrounds (bottle, hazelnut, metal_nut, screw, pill, ...), not for textures. ``--method empty`` writes
all-black masks: for texture classes (carpet, grid, leather, tile, wood) there is no object, so the
background is the whole image.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

import numpy as np

from utils.cli import run_cli

METHODS = ("border", "empty")


def border_mask(rgb: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """bool [H, W]: pixels whose colour is far (Otsu) from the median colour of the image's outer frame."""
    from scipy import ndimage

    from eval.mask_extraction import otsu_threshold

    x = rgb.astype(np.float64)
    frame = np.concatenate(
        [x[:2].reshape(-1, 3), x[-2:].reshape(-1, 3), x[:, :2].reshape(-1, 3), x[:, -2:].reshape(-1, 3)]
    )
    dist = np.linalg.norm(x - np.median(frame, axis=0), axis=-1)
    dist = ndimage.gaussian_filter(dist, sigma)
    if dist.max() - dist.min() < 1e-6:
        return np.zeros(dist.shape, dtype=bool)
    dist = (dist - dist.min()) / (dist.max() - dist.min())  # otsu_threshold works on [0, 1] values
    return ndimage.binary_fill_holes(dist > otsu_threshold(dist))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--mvtec_root", required=True, help="MVTec AD root (<class>/train/good, <class>/test/<defect>)"
    )
    p.add_argument("--mvtec_name", required=True, help="class, e.g. hazelnut")
    p.add_argument(
        "--subsets", nargs="+", required=True, help="defect types (test/<defect>) and/or 'good' (train/good)"
    )
    p.add_argument("--output_dir", required=True, help="mask root: <output_dir>/<class>/<subset>/<file>")
    p.add_argument("--method", choices=METHODS, default="border", help="border (objects) or empty (textures)")
    args = p.parse_args(argv)

    from PIL import Image

    from datasets.mvtec import check_class_dir, defect_images, good_images
    from utils.checkpoint import atomic_write
    from utils.images import read_image

    check_class_dir(args.mvtec_root, args.mvtec_name)
    for subset in args.subsets:
        if subset == "good":
            images = good_images(args.mvtec_root, args.mvtec_name)
        else:
            images = defect_images(args.mvtec_root, args.mvtec_name, subset)
        out = Path(args.output_dir) / args.mvtec_name / subset
        out.mkdir(parents=True, exist_ok=True)
        for path in images:
            rgb = np.asarray(read_image(path, "RGB"))
            mask = border_mask(rgb) if args.method == "border" else np.zeros(rgb.shape[:2], dtype=bool)
            with atomic_write(out / path.name) as tmp:
                Image.fromarray(mask.astype(np.uint8) * 255, "L").save(tmp, format="PNG")
        print(f"{len(images)} masks ({args.method}) in {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
