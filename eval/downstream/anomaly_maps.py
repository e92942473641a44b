"""Saved anomaly maps of the localization evaluation: the layout MVTec AD's official evaluation reads, and
re-scoring them.

Layout written under ``<output_dir>/anomaly_maps/`` by eval/downstream/localization.py:

    <class>/test/<defect>/<image_id>.npy     float32 map at the evaluation resolution (softmax anomaly prob.)
    <class>/test/<defect>/<image_id>.tiff    float32 map at the original image size (--anomaly_maps tiff / both,
                                             or later with the tiff command below)
    index.csv                                defect, image, ground_truth (empty for good), npy, tiff (paths)
    mvtec_subset/<class>/test/<defect>/<image_id>.png            links to the evaluated MVTec test images and
    mvtec_subset/<class>/ground_truth/<defect>/<image_id>_mask.png  their masks (only the held-out ones)

``<class>/test/<defect>/<image_id>.tiff`` is MVTec AD's ``evaluate_experiment.py`` layout
(``<anomaly_maps_dir>/<object_name>/test/<defect_name>/<image_id>.tiff``, real-valued, the size of the dataset
image); its ``--dataset_base_dir`` must hold exactly the evaluated test images, which ``mvtec_subset/`` does
(the few-shot training images are left out of this evaluation). The same ``.npy`` maps load with ``numpy.load``
into anomalib-style tensors.

    # re-score the saved maps (the same metrics as metrics.json; another AU-PRO rule / limit / F1 grid):
    python eval/downstream/anomaly_maps.py score --maps_dir outputs/.../anomaly_maps --au_pro_rule mvtec \
        [--au_pro_limit 0.3] [--au_pro_num_thresholds 100] [--f1_grid_step 0.05] [--output_json rescored.json]
    # write the .tiff maps later (original image size) for MVTec's own script:
    python eval/downstream/anomaly_maps.py tiff --maps_dir outputs/.../anomaly_maps
    python evaluate_experiment.py --dataset_base_dir outputs/.../anomaly_maps/mvtec_subset \
        --anomaly_maps_dir outputs/.../anomaly_maps --evaluated_objects hazelnut
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import csv
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from eval.downstream.au_pro import AU_PRO_RULES
from eval.downstream.data import TestItem, load_test_set
from eval.downstream.metrics import AU_PRO_LIMIT, IMAGE_SCORE_KERNEL, localization_metrics
from utils.checkpoint import atomic_write
from utils.cli import UserError, run_cli

MAPS_DIR = "anomaly_maps"
INDEX_NAME = "index.csv"
SUBSET_DIR = "mvtec_subset"
FORMATS = ("npy", "tiff", "both", "none")
COLUMNS = ("defect", "image", "ground_truth", "npy", "tiff")


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # file systems without symlinks
        shutil.copyfile(src, dst)


def write_tiff(anomaly_map: np.ndarray, path: Path, size: tuple[int, int]) -> None:
    """A float32 TIFF of ``anomaly_map`` resized (bilinear) to ``size`` = (width, height)."""
    from PIL import Image

    m = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))[None, None]
    if (m.shape[-1], m.shape[-2]) != size:
        m = torch.nn.functional.interpolate(m, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        Image.fromarray(m[0, 0].numpy(), mode="F").save(tmp, format="TIFF")


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def save_anomaly_maps(
    out_dir: str | os.PathLike,
    class_name: str,
    items: Sequence[TestItem],
    maps: torch.Tensor,
    fmt: str = "npy",
) -> Path | None:
    """Write ``maps`` ``[N,R,R]`` of the test ``items`` in the layout above; returns the maps folder."""
    if fmt == "none":
        return None
    if fmt not in FORMATS:
        raise ValueError(f"anomaly map format must be one of {FORMATS}, got {fmt!r}")
    root = Path(out_dir) / MAPS_DIR
    rows = []
    for it, m in zip(items, maps.float().cpu().numpy(), strict=True):
        rel = Path(class_name) / "test" / it.defect / it.image.stem
        npy = tiff = ""
        if fmt in ("npy", "both"):
            npy = rel.with_suffix(".npy").as_posix()
            (root / npy).parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(root / npy) as tmp, open(tmp, "wb") as f:
                np.save(f, m.astype(np.float32))
        if fmt in ("tiff", "both"):
            tiff = rel.with_suffix(".tiff").as_posix()
            write_tiff(m, root / tiff, _image_size(it.image))
        sub = root / SUBSET_DIR / class_name
        _link(it.image, sub / "test" / it.defect / it.image.name)
        if it.mask is not None:
            _link(it.mask, sub / "ground_truth" / it.defect / it.mask.name)
        rows.append(
            [it.defect, str(it.image.resolve()), str(it.mask.resolve()) if it.mask else "", npy, tiff]
        )
    with atomic_write(root / INDEX_NAME) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)
    return root


def read_index(maps_dir: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(maps_dir) / INDEX_NAME
    if not path.is_file():
        raise UserError(
            f"{path} not found: --maps_dir must be the anomaly_maps/ folder of a localization run "
            "(eval/downstream/localization.py --anomaly_maps npy|tiff|both)"
        )
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_maps(maps_dir: str | os.PathLike, rows: list[dict[str, str]]) -> torch.Tensor:
    root = Path(maps_dir)
    missing = [r["image"] for r in rows if not r["npy"]]
    if missing:
        raise UserError(
            f"{len(missing)} maps were saved without .npy (e.g. for {missing[0]}); score needs them"
        )
    return torch.stack([torch.from_numpy(np.load(root / r["npy"])) for r in rows])


def score(maps_dir: str | os.PathLike, **options: Any) -> dict[str, dict[str, float]]:
    """The metrics of the saved maps against their ground truth (masks resized as in the evaluation), for the
    whole set and per defect type (good + that type), as in metrics.json."""
    rows = read_index(maps_dir)
    maps = load_maps(maps_dir, rows)
    items = [
        TestItem(Path(r["image"]), Path(r["ground_truth"]) if r["ground_truth"] else None, r["defect"])
        for r in rows
    ]
    _, masks = load_test_set(items, maps.shape[-1])
    good = [i for i, it in enumerate(items) if it.defect == "good"]
    results = {"all": localization_metrics(maps, masks, **options)}
    for d in sorted({it.defect for it in items} - {"good"}):
        index = good + [i for i, it in enumerate(items) if it.defect == d]
        results[d] = localization_metrics(maps[index], masks[index], **options)
    return results


def export_tiff(maps_dir: str | os.PathLike) -> int:
    """Write the .tiff maps (original image size) from the .npy ones and update the index; returns the count."""
    root = Path(maps_dir)
    rows = read_index(root)
    maps = load_maps(root, rows)
    for r, m in zip(rows, maps.numpy(), strict=True):
        r["tiff"] = Path(r["npy"]).with_suffix(".tiff").as_posix()
        write_tiff(m, root / r["tiff"], _image_size(Path(r["image"])))
    with atomic_write(root / INDEX_NAME) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="re-score saved maps (writes nothing unless --output_json)")
    s.add_argument("--maps_dir", required=True, help="the anomaly_maps/ folder of a localization run")
    s.add_argument(
        "--image_score_kernel", type=int, default=IMAGE_SCORE_KERNEL, help="image score box filter"
    )
    s.add_argument("--f1_grid_step", type=float, default=0.0, help="pixel F1-max grid (0: every threshold)")
    s.add_argument("--au_pro_limit", type=float, default=AU_PRO_LIMIT, help="FPR limit of AU-PRO")
    s.add_argument("--au_pro_rule", choices=AU_PRO_RULES, default="dualanodiff", help="AU-PRO tie rule")
    s.add_argument("--au_pro_num_thresholds", type=int, default=None, help="dualanodiff: sampled positions")
    s.add_argument("--output_json", default=None, help="also write the metrics here")
    t = sub.add_parser(
        "tiff", help="write the .tiff maps (original image size) for MVTec's evaluate_experiment.py"
    )
    t.add_argument("--maps_dir", required=True, help="the anomaly_maps/ folder of a localization run")
    args = p.parse_args(argv)
    if args.command == "tiff":
        n = export_tiff(args.maps_dir)
        print(
            f"{n} .tiff maps under {args.maps_dir}; MVTec dataset subset: {Path(args.maps_dir) / SUBSET_DIR}"
        )
        return {"tiff": n}
    results = score(
        args.maps_dir,
        kernel=args.image_score_kernel,
        f1_grid_step=args.f1_grid_step,
        fpr_limit=args.au_pro_limit,
        au_pro_rule=args.au_pro_rule,
        au_pro_num_thresholds=args.au_pro_num_thresholds,
    )
    print(json.dumps(results, indent=2))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    run_cli(main)
