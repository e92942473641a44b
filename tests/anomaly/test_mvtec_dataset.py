"""MVTec layout checks, the few-shot split, paired flips and mask binarisation."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.mvtec import (
    MVTecAnomalyPairDataset,
    MVTecGoodDataset,
    apply_flip,
    few_shot_split,
    flip_code_for,
    mask_path_for,
)


@pytest.mark.parametrize("n", range(1, 11))
def test_ceil_split_has_no_overlap(n):
    paths = [f"/x/{i:03d}.png" for i in reversed(range(n))]  # unsorted input
    train, held = few_shot_split(paths)
    assert len(train) == math.ceil(n / 3)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(Path(p) for p in paths)
    assert train == sorted(train) and train[0] == Path("/x/000.png")


def test_original_rule_overlaps_by_one_when_not_divisible():
    paths = [f"{i:03d}.png" for i in range(10)]  # 10 % 3 == 1
    train, held = few_shot_split(paths, rule="original")
    assert len(train) == 4 and held[0] == Path("003.png") and set(train) & set(held) == {Path("003.png")}
    train, held = few_shot_split(paths[:9], rule="original")  # divisible: no overlap
    assert len(train) == 3 and not set(train) & set(held)
    with pytest.raises(ValueError, match="split rule"):
        few_shot_split(paths, rule="half")


def test_mask_path_built_from_parts():
    p = Path("/data/test/mvtec_test/hazelnut/test/hole/003.png")
    assert mask_path_for(p) == Path("/data/test/mvtec_test/hazelnut/ground_truth/hole/003_mask.png")
    with pytest.raises(ValueError):
        mask_path_for("/data/hazelnut/train/good/000.png")


def test_layout_errors_list_what_exists(tiny_assets):
    root = tiny_assets["mvtec"]
    with pytest.raises(FileNotFoundError, match=r"carpet.*hazelnut|hazelnut.*carpet"):
        MVTecGoodDataset(root, "bottle", 64)
    with pytest.raises(FileNotFoundError, match=r"crack.*hole"):
        MVTecAnomalyPairDataset(root, "hazelnut", "scratch", 64)


def test_missing_mask_names_the_file(tiny_assets, tmp_path):
    root = tmp_path / "mvtec"
    shutil.copytree(tiny_assets["mvtec"] / "hazelnut", root / "hazelnut")
    (root / "hazelnut/ground_truth/hole/001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="001_mask.png"):
        MVTecAnomalyPairDataset(root, "hazelnut", "hole", 64)


def _write_case(root: Path) -> np.ndarray:
    """One defect image with an asymmetric mask containing grey values around 0.5."""
    (root / "c/test/d").mkdir(parents=True)
    (root / "c/ground_truth/d").mkdir(parents=True)
    (root / "c/train/good").mkdir(parents=True)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(img).save(root / "c/test/d/000.png")
    Image.fromarray(img).save(root / "c/train/good/000.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[2:6, 1:9] = 255
    mask[10, 10] = 128  # 0.502 -> in
    mask[12, 12] = 127  # 0.498 -> out
    Image.fromarray(mask, mode="L").save(root / "c/ground_truth/d/000_mask.png")
    return img


def test_pairs_share_flips_and_masks_are_binary(tmp_path):
    img = _write_case(tmp_path)
    ds = MVTecAnomalyPairDataset(tmp_path, "c", "d", resolution=16, flip="both")
    assert len(ds) == 1
    m = ds.masks[0][0].numpy()
    assert m.dtype == bool and m[10, 10] and not m[12, 12] and m[2:6, 1:9].all() and m.sum() == 4 * 8 + 1
    seen = set()
    for seed in range(40):
        item = ds[(0, seed)]
        code = item["flip"]
        seen.add(code)
        assert code == flip_code_for(seed, "both")
        expected = apply_flip(torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1, code)
        torch.testing.assert_close(item["pixel_values"], expected)
        mask = item["mask"]
        torch.testing.assert_close(mask, apply_flip(ds.masks[0], code))
        fg = torch.where(mask, item["pixel_values"], torch.full_like(item["pixel_values"], -1.0))
        torch.testing.assert_close(item["fg_values"], fg)
    assert seen == {0, 1, 2, 3}
    assert {flip_code_for(s, "horizontal") for s in range(40)} == {0, 1}
    assert {flip_code_for(s, "none") for s in range(10)} == {0}


def test_good_dataset_range_and_corrupt_image(tmp_path):
    _write_case(tmp_path)
    ds = MVTecGoodDataset(tmp_path, "c", 8)
    x = ds[(0, 3)]["pixel_values"]
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
    (tmp_path / "c/train/good/001.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="001.png"):
        MVTecGoodDataset(tmp_path, "c", 8)
