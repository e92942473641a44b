"""Stand-in "generated" anomaly pairs for the demo and tests: the synthetic MVTec renderer's defects, written
in the layout of ``eval/generate.py stage2``.

    python preprocessing/standin_generated.py --out outputs/demo_downstream/generate_data --class_name hazelnut

Writes ``<out>/<class>/<defect>/{image,mask}/NNNN.png`` for every defect type of the synthetic class, drawn
with the split key "generated" (so they are new images, not copies of the synthetic train/test ones). They
are NOT diffusion-model output: they only let the downstream evaluation run end to end in seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

import numpy as np
from PIL import Image

from preprocessing.synthetic_mvtec import MVTEC_CLASSES, render_sample


def write_standin_pairs(
    out: str | Path, class_name: str, num_images: int = 8, size: int = 64, seed: int = 0
) -> Path:
    """Write the pairs of every defect type of ``class_name``; returns ``<out>/<class_name>``."""
    if class_name not in MVTEC_CLASSES:
        raise ValueError(f"unknown synthetic class {class_name!r}; choose from {sorted(MVTEC_CLASSES)}")
    class_dir = Path(out) / class_name
    for defect in MVTEC_CLASSES[class_name]:
        image_dir, mask_dir = class_dir / defect / "image", class_dir / defect / "mask"
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(num_images):
            _, bad, mask = render_sample(class_name, "generated", defect, i, size=size, seed=seed)
            Image.fromarray(bad).save(image_dir / f"{i:04d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(mask_dir / f"{i:04d}.png")
    return class_dir


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", required=True, help="generated-data root to write (like eval/generate.py --output_root)"
    )
    p.add_argument("--class_name", default="hazelnut", help=f"one of {sorted(MVTEC_CLASSES)}")
    p.add_argument("--num_images", type=int, default=8, help="pairs per defect type")
    p.add_argument("--size", type=int, default=64, help="image side (the tiny MVTec assets are 64)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return write_standin_pairs(args.out, args.class_name, args.num_images, args.size, args.seed)


if __name__ == "__main__":
    print(main())
