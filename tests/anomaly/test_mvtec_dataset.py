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
    reference_flip,
)


def _reference_train_count(n_files: int) -> int:
    """The reference trainers' count, written as their code does it."""
    n = n_files // 3
    if n % 3:
        n += 1
    return n


# N for which the references' rule and ceil(N/3) disagree (issue 10)
DIFFERING_N = (6, 10, 11, 12, 15, 19, 20, 21, 24, 28, 29, 30)


@pytest.mark.parametrize("n", [*DIFFERING_N, 3, 7, 17, 18])
def test_official_split_is_the_references_rule(n):
    paths = [f"/x/{i:03d}.png" for i in reversed(range(n))]  # unsorted input
    train, held = few_shot_split(paths)  # official is the default
    assert len(train) == _reference_train_count(n)
    assert train == [Path(f"/x/{i:03d}.png") for i in range(len(train))]  # the first ones, sorted
    assert not set(train) & set(held) and sorted(train + held) == sorted(Path(p) for p in paths)


def _names(n: int) -> list[str]:
    return [f"{i:03d}.png" for i in range(n)]


def test_official_and_ceil_differ_exactly_for_the_listed_n():
    differ = [n for n in range(4, 31) if len(few_shot_split(_names(n))[0]) != math.ceil(n / 3)]
    assert tuple(differ) == DIFFERING_N
    # N = 20: 20 // 3 = 6, a multiple of 3 -> 6 (ceil: 7); N = 10: 3 -> 3 (ceil: 4)
    assert len(few_shot_split(_names(20))[0]) == 6 and len(few_shot_split(_names(10))[0]) == 3
    assert len(few_shot_split(_names(3))[0]) == 2  # 3 // 3 = 1, not a multiple of 3 -> 2
    with pytest.raises(ValueError, match="no training image.*ceil"):
        few_shot_split(_names(2))  # 2 // 3 = 0


@pytest.mark.parametrize("n", range(1, 11))
def test_ceil_split_kept_by_name(n):
    paths = [f"/x/{i:03d}.png" for i in reversed(range(n))]
    train, held = few_shot_split(paths, rule="ceil")
    assert len(train) == math.ceil(n / 3)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(Path(p) for p in paths)
    assert train == sorted(train) and train[0] == Path("/x/000.png")
    with pytest.raises(ValueError, match="split rule"):
        few_shot_split(paths, rule="original")


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
    ds = MVTecAnomalyPairDataset(
        tmp_path, "c", "d", resolution=16, flip="hv", fg_background="black", split_rule="ceil"
    )
    assert len(ds) == 1
    m = ds.masks[0][0].numpy()
    assert m.dtype == bool and m[10, 10] and not m[12, 12] and m[2:6, 1:9].all() and m.sum() == 4 * 8 + 1
    seen = set()
    for seed in range(40):
        item = ds[(0, seed)]
        code = item["flip"]
        seen.add(code)
        assert code == flip_code_for(seed, "hv")
        expected = apply_flip(torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1, code)
        torch.testing.assert_close(item["pixel_values"], expected)
        mask = item["mask"]
        torch.testing.assert_close(mask, apply_flip(ds.masks[0], code))
        fg = torch.where(mask, item["pixel_values"], torch.full_like(item["pixel_values"], -1.0))
        torch.testing.assert_close(item["fg_values"], fg)
    assert seen == {0, 1, 2, 3}
    assert {flip_code_for(s, "h") for s in range(40)} == {0, 1}
    assert {flip_code_for(s, "none") for s in range(10)} == {0}


def test_good_dataset_range_and_corrupt_image(tmp_path):
    _write_case(tmp_path)
    ds = MVTecGoodDataset(tmp_path, "c", 8)
    x = ds[(0, 3)]["pixel_values"]
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
    (tmp_path / "c/train/good/001.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="001.png"):
        MVTecGoodDataset(tmp_path, "c", 8)


def test_reference_flips_by_default(tmp_path):
    _write_case(tmp_path)
    assert MVTecAnomalyPairDataset(tmp_path, "c", "d", resolution=16, split_rule="ceil").flip == "hv"
    assert MVTecGoodDataset(tmp_path, "c", 16).flip == "hv"
    assert reference_flip("cable") == "none" and reference_flip("hazelnut") == "hv"
    with pytest.raises(ValueError, match="flip"):
        MVTecGoodDataset(tmp_path, "c", 16, flip="both")


def test_fg_is_the_references_image_times_mask(tmp_path):
    """grey (default): fg = normalised image x binary mask, i.e. 0 outside; black: -1 outside."""
    img = _write_case(tmp_path)
    kw = dict(resolution=16, flip="none", split_rule="ceil")
    grey = MVTecAnomalyPairDataset(tmp_path, "c", "d", **kw)
    black = MVTecAnomalyPairDataset(tmp_path, "c", "d", fg_background="black", **kw)
    item, item_black = grey[(0, 0)], black[(0, 0)]
    normalised = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - 0.5) / 0.5  # ToTensor, Normalize
    mask = item["mask"].float()
    torch.testing.assert_close(item["fg_values"], normalised * mask)
    outside = ~item["mask"].expand(3, -1, -1)
    assert (item["fg_values"][outside] == 0).all() and (item_black["fg_values"][outside] == -1).all()
    torch.testing.assert_close(item_black["fg_values"][~outside], item["fg_values"][~outside])


def _write_nonsquare(root: Path) -> tuple[np.ndarray, np.ndarray]:
    (root / "c/test/d").mkdir(parents=True)
    (root / "c/ground_truth/d").mkdir(parents=True)
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)  # H=30, W=45: resize then crop the width
    mask = (rng.random((30, 45)) > 0.6).astype(np.uint8) * 255
    mask[5:20, 10:30] = 255
    Image.fromarray(img).save(root / "c/test/d/000.png")
    Image.fromarray(mask, mode="L").save(root / "c/ground_truth/d/000_mask.png")
    return img, mask


def test_bilinear_resize_equals_torchvision_on_pil(tmp_path):
    """resize_mode=bilinear (default) == the references' transforms.Resize(R, BILINEAR) on the PIL image
    (+ centre crop), for the image and for the mask binarised at 0.5."""
    from torchvision import transforms

    img, mask = _write_nonsquare(tmp_path)
    ds = MVTecAnomalyPairDataset(tmp_path, "c", "d", resolution=16, flip="none", split_rule="ceil")
    ref = transforms.Compose(
        [
            transforms.Resize(16, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(16),
            transforms.PILToTensor(),
        ]
    )
    torch.testing.assert_close(ds.images[0], ref(Image.fromarray(img)), atol=0, rtol=0)
    ref_mask = ref(Image.fromarray(mask, mode="L")).float() / 255 >= 0.5
    assert torch.equal(ds.masks[0], ref_mask)


def test_bicubic_center_crop_mode_by_name(tmp_path):
    import torch.nn.functional as F

    img, mask = _write_nonsquare(tmp_path)
    kw = dict(resolution=16, split_rule="ceil")
    ds = MVTecAnomalyPairDataset(tmp_path, "c", "d", resize_mode="bicubic_center_crop", **kw)
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None]
    want = F.interpolate(x, size=(16, 24), mode="bicubic", antialias=True, align_corners=False)[0]
    want = want[:, :, 4:20].round().clamp(0, 255).to(torch.uint8)
    torch.testing.assert_close(ds.images[0], want, atol=0, rtol=0)
    bilinear = MVTecAnomalyPairDataset(tmp_path, "c", "d", **kw)
    assert not torch.equal(ds.images[0], bilinear.images[0])
    with pytest.raises(ValueError, match="resize_mode"):
        MVTecAnomalyPairDataset(tmp_path, "c", "d", resize_mode="nearest", **kw)
