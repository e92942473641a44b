"""The anomalib Folder export: the layout read with anomalib's own pairing and split rules (written out here;
anomalib is not installed in the test environment and not a dependency)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from preprocessing.standin_generated import write_standin_pairs

IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def anomalib_folder_samples(args: dict) -> list[dict]:
    """anomalib ``make_folder_dataset``: files of each directory kind, all rows sorted by path; masks paired
    with the anomalous images by sorted position and each mask's stem must contain its image's stem; normal_dir
    images -> train, abnormal_dir and normal_test_dir images -> test."""
    root = Path(args["root"])

    def files(dirs):
        dirs = [dirs] if isinstance(dirs, str) else dirs or []
        return [p for d in dirs for p in (root / d).iterdir() if p.suffix.lower() in IMG_EXT]

    rows = [
        (str(p), kind)
        for kind in ("normal", "abnormal", "normal_test", "mask")
        for p in files(args[f"{kind}_dir"])
    ]
    rows.sort()
    masks = [p for p, k in rows if k == "mask"]
    abnormal = [p for p, k in rows if k == "abnormal"]
    paired = dict(zip(abnormal, masks))
    for img, msk in paired.items():
        assert Path(img).stem in Path(msk).stem, "anomalib MisMatchError"
    return [
        {
            "image": p,
            "label": int(k == "abnormal"),
            "mask": paired.get(p, ""),
            "split": "train" if k == "normal" else "test",
        }
        for p, k in rows
        if k != "mask"
    ]


def test_export_layout_reads_back_with_anomalibs_rules(tiny_assets, tmp_path):
    from eval.downstream.export_anomalib import FOLDER_ARGS_NAME, main

    gen = tmp_path / "gen"
    write_standin_pairs(gen, "hazelnut", num_images=3, size=64)
    args = main(
        ["--class_name", "hazelnut", "--mvtec_root", str(tiny_assets["mvtec"]), "--generated_root", str(gen),
         "--out", str(tmp_path / "anomalib")]
    )  # fmt: skip
    root = Path(args["root"])
    assert json.loads((root / FOLDER_ARGS_NAME).read_text()) == args
    samples = anomalib_folder_samples(args)
    train = [s for s in samples if s["split"] == "train"]
    test = [s for s in samples if s["split"] == "test"]
    mvtec = tiny_assets["mvtec"] / "hazelnut"
    assert len(train) == len(list((mvtec / "train" / "good").iterdir())) and all(
        s["label"] == 0 for s in train
    )
    abnormal = [s for s in test if s["label"] == 1]
    assert len(abnormal) == 2 * 3  # crack + hole, 3 pairs each
    assert len(test) - len(abnormal) == len(list((mvtec / "test" / "good").iterdir()))
    for s in abnormal:  # each generated image with its own mask, pixel-aligned, binary
        defect, stem = Path(s["image"]).parent.name, Path(s["image"]).stem
        src = gen / "hazelnut" / defect / "mask" / f"{stem.split('_', 1)[1]}.png"
        assert np.array_equal(np.asarray(Image.open(s["mask"])), np.asarray(Image.open(src)))
        assert Image.open(s["mask"]).size == Image.open(s["image"]).size
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["counts"]["test/crack"] == 3 and manifest["inputs"] == {"crack": None, "hole": None}


def test_missing_pairs_fail_clearly(tiny_assets, tmp_path):
    from eval.downstream.data import DownstreamDataError
    from eval.downstream.export_anomalib import export

    with pytest.raises(DownstreamDataError, match="no generated data"):
        export("hazelnut", tiny_assets["mvtec"], tmp_path / "none", tmp_path / "out")
