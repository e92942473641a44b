"""Export generated anomaly pairs in the folder layout of anomalib's ``Folder`` datamodule (anomalib is not a
dependency of this repository; the export only writes files).

    python eval/downstream/export_anomalib.py --class_name hazelnut --mvtec_root datasets/mvtec_ad \
        --generated_root generate_data --out anomalib_data

writes ``<out>/<class>/``:

    train/good/<name>                      real MVTec train/good images       -> Folder normal_dir (training)
    test/good/<name>                       real MVTec test/good images        -> Folder normal_test_dir (test)
    test/<defect>/<defect>_NNNN.png        generated anomalous images         -> Folder abnormal_dir (test)
    ground_truth/<defect>/<defect>_NNNN.png  generated masks (0 / 255)        -> Folder mask_dir
    anomalib_folder.json                   the Folder arguments for this layout
    manifest.json                          the generated sets' manifests (eval/manifest.py)

and is used with

    import json
    from anomalib.data import Folder
    datamodule = Folder(**json.load(open("anomalib_data/hazelnut/anomalib_folder.json")))

anomalib's rules this layout satisfies (``make_folder_dataset``): every ``normal_dir`` image is a training
sample, ``abnormal_dir`` and ``normal_test_dir`` images are test samples (``test_split_mode="from_dir"``); the
masks are paired with the anomalous images by sorted path, and each mask's file stem must contain its image's
stem - so images and masks share their file names, and the defect prefix keeps names unique across types.
``val_split_mode="same_as_test"`` validates on the test set (anomalib's default for Folder is a split of it).
Generated pairs are *test* data here: anomalib's unsupervised models train on normal images only, and the
generated anomalies stand in for real ones when measuring a detector (docs/anomaly_downstream.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import json
import os
import shutil
from typing import Any

from datasets.mvtec import good_images
from eval.downstream.data import DownstreamDataError, find_generated_pairs, resolve_defects
from eval.manifest import check_sets, write_manifest
from utils.cli import run_cli
from utils.logging import get_logger

logger = get_logger("downstream.export_anomalib")
FOLDER_ARGS_NAME = "anomalib_folder.json"


def _put(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if link:
        os.symlink(src.resolve(), dst)
    else:
        shutil.copyfile(src, dst)


def export(
    class_name: str,
    mvtec_root: str | os.PathLike,
    generated_root: str | os.PathLike,
    out: str | os.PathLike,
    defects: list[str] | None = None,
    link: bool = False,
    allow_mixed_weights: bool = False,
) -> dict[str, Any]:
    """Write the layout above; returns the ``Folder`` arguments (also written to ``anomalib_folder.json``)."""
    defects = resolve_defects(mvtec_root, class_name, defects)
    pairs = find_generated_pairs(generated_root, class_name, defects)  # image/mask pairing and sizes checked
    manifests = check_sets({d: Path(generated_root) / class_name / d for d in defects}, allow_mixed_weights)
    root = Path(out) / class_name
    if root.exists():
        shutil.rmtree(root)  # a fresh export: no stale files of an earlier one
    train_good = good_images(mvtec_root, class_name)
    test_good_dir = Path(mvtec_root) / class_name / "test" / "good"
    test_good = sorted(p for p in test_good_dir.iterdir() if p.is_file()) if test_good_dir.is_dir() else []
    if not test_good:
        raise DownstreamDataError(
            f"no test/good images in {test_good_dir}: anomalib's test set needs normal images"
        )
    for p in train_good:
        _put(p, root / "train" / "good" / p.name, link)
    for p in test_good:
        _put(p, root / "test" / "good" / p.name, link)
    for d, pr in pairs.items():
        for img, msk in zip(pr.images, pr.masks, strict=True):
            name = f"{d}_{img.stem}{img.suffix}"
            _put(img, root / "test" / d / name, link)
            _put(msk, root / "ground_truth" / d / f"{d}_{img.stem}{msk.suffix}", link)
    folder_args = {
        "name": class_name,
        "root": str(root.resolve()),
        "normal_dir": "train/good",
        "abnormal_dir": [f"test/{d}" for d in defects],
        "normal_test_dir": "test/good",
        "mask_dir": [f"ground_truth/{d}" for d in defects],
        "test_split_mode": "from_dir",
        "val_split_mode": "same_as_test",
    }
    (root / FOLDER_ARGS_NAME).write_text(json.dumps(folder_args, indent=2) + "\n")
    write_manifest(
        root,
        {
            "kind": "anomalib_export",
            "class": class_name,
            "counts": {"train/good": len(train_good), "test/good": len(test_good)}
            | {f"test/{d}": len(p.images) for d, p in pairs.items()},
            "inputs": manifests,
            "allowed_mixed_weights": allow_mixed_weights,
        },
    )
    logger.info("anomalib Folder layout in %s (%s)", root, FOLDER_ARGS_NAME)
    return folder_args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--class_name", required=True, help="MVTec class")
    p.add_argument("--mvtec_root", default="datasets/mvtec_ad", help="MVTec AD root (real normal images)")
    p.add_argument("--generated_root", default="generate_data", help="eval/generate.py --output_root")
    p.add_argument("--out", required=True, help="export root; <out>/<class>/ is replaced")
    p.add_argument("--defects", nargs="*", default=None, help="defect types (default: all generated ones)")
    p.add_argument("--link", action="store_true", help="symbolic links instead of copies")
    p.add_argument(
        "--allow_mixed_weights", action="store_true", help="export sets whose manifests show mixed weights"
    )
    args = p.parse_args(argv)
    return export(
        args.class_name,
        args.mvtec_root,
        args.generated_root,
        args.out,
        args.defects,
        args.link,
        args.allow_mixed_weights,
    )


if __name__ == "__main__":
    run_cli(main)
