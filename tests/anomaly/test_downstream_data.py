"""Downstream data: the held-out split never holds a few-shot training image; bad folders give clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.mvtec import SPLIT_RULES, defect_images, few_shot_split, good_images
from eval.downstream.data import (
    DownstreamDataError,
    GeneratedClassificationDataset,
    GeneratedSegmentationDataset,
    MixedSegmentationDataset,
    PerlinSegmentationDataset,
    find_generated_pairs,
    held_out_images,
    held_out_test_set,
    resolve_defects,
)
from preprocessing.standin_generated import write_standin_pairs


@pytest.fixture()
def mvtec(tiny_assets, tmp_path) -> Path:
    """A private copy of the synthetic hazelnut class (tests below damage it)."""
    root = tmp_path / "mvtec"
    shutil.copytree(tiny_assets["mvtec"] / "hazelnut", root / "hazelnut")
    return root


@pytest.fixture()
def generated(tmp_path) -> Path:
    root = tmp_path / "generate_data"
    write_standin_pairs(root, "hazelnut", num_images=3, size=64)
    return root


@pytest.mark.parametrize("rule", SPLIT_RULES)
def test_held_out_images_never_contain_a_training_image(rule):
    rng = np.random.default_rng(0)
    for n in range(1, 41):
        paths = [Path(f"/data/c/test/d/{i:03d}.png") for i in range(n)]
        shuffled = [paths[i] for i in rng.permutation(n)]  # input order must not matter
        try:
            train, _ = few_shot_split(paths, rule)
        except ValueError:  # a rule may refuse sets too small to give a training image
            with pytest.raises(ValueError):
                held_out_images(shuffled, rule)
            continue
        held = held_out_images(shuffled, rule)
        assert not set(held) & set(train), (rule, n)
        assert set(held) | set(train) == set(paths), (rule, n)
        assert held == sorted(held)


def test_test_set_is_good_plus_held_out_images(mvtec):
    defects = resolve_defects(mvtec, "hazelnut", None)
    assert defects == ["crack", "hole"]
    for rule in SPLIT_RULES:
        items = held_out_test_set(mvtec, "hazelnut", defects, rule)
        assert [it.image for it in items if it.defect == "good"] == sorted(
            (mvtec / "hazelnut/test/good").iterdir()
        )
        for d in defects:
            train, _ = few_shot_split(defect_images(mvtec, "hazelnut", d), rule)
            tested = [it.image for it in items if it.defect == d]
            assert tested and not set(tested) & set(train)
            assert all(it.mask.is_file() for it in items if it.defect == d)


def test_generated_pairs_found_and_checked(generated):
    pairs = find_generated_pairs(generated, "hazelnut", ["crack", "hole"])
    assert [p.name for p in pairs["hole"].images] == ["0000.png", "0001.png", "0002.png"]
    assert [p.parent.name for p in pairs["hole"].masks] == ["mask"] * 3
    assert len(find_generated_pairs(generated, "hazelnut", ["hole"], max_per_defect=2)["hole"].images) == 2


def test_no_generated_pairs_for_a_defect(generated):
    shutil.rmtree(generated / "hazelnut" / "crack")
    with pytest.raises(
        DownstreamDataError, match=r"no generated pairs for defect type 'crack'.*eval/generate.py"
    ):
        find_generated_pairs(generated, "hazelnut", ["crack", "hole"])
    (generated / "hazelnut" / "crack" / "image").mkdir(parents=True)  # an empty folder is no better
    with pytest.raises(DownstreamDataError, match="no generated pairs for defect type 'crack'"):
        find_generated_pairs(generated, "hazelnut", ["crack", "hole"])
    with pytest.raises(DownstreamDataError, match="no generated data for class 'carpet'"):
        find_generated_pairs(generated, "carpet", ["cut"])


def test_mask_image_size_mismatch_and_missing_masks(generated):
    mask = generated / "hazelnut" / "hole" / "mask" / "0001.png"
    Image.new("L", (32, 64)).save(mask)
    with pytest.raises(DownstreamDataError, match=r"mask/image size mismatch: .*0001.png is 64x64 .* 32x64"):
        find_generated_pairs(generated, "hazelnut", ["hole"])
    mask.unlink()
    with pytest.raises(DownstreamDataError, match=r"0001.png has no mask"):
        find_generated_pairs(generated, "hazelnut", ["hole"])
    # the classifier needs only images
    assert len(find_generated_pairs(generated, "hazelnut", ["hole"], need_masks=False)["hole"].images) == 3


def test_class_without_ground_truth(mvtec):
    gt = mvtec / "hazelnut" / "ground_truth"
    held = held_out_images(defect_images(mvtec, "hazelnut", "hole"), SPLIT_RULES[0])
    missing = gt / "hole" / f"{held[0].stem}_mask.png"
    Image.new("L", (32, 32)).save(missing)
    with pytest.raises(DownstreamDataError, match="mask/image size mismatch"):
        held_out_test_set(mvtec, "hazelnut", ["hole"], SPLIT_RULES[0])
    missing.unlink()
    with pytest.raises(DownstreamDataError, match=r"no ground truth for .*does not exist"):
        held_out_test_set(mvtec, "hazelnut", ["hole"], SPLIT_RULES[0])
    shutil.rmtree(gt)
    with pytest.raises(DownstreamDataError, match="class 'hazelnut' has no ground truth"):
        held_out_test_set(mvtec, "hazelnut", ["hole"], SPLIT_RULES[0])
    with pytest.raises(DownstreamDataError, match=r"--defects \['scratch'\] not found"):
        resolve_defects(mvtec, "hazelnut", ["scratch"])


def test_training_items_depend_only_on_their_seed(mvtec, generated):
    good = good_images(mvtec, "hazelnut")
    pairs = find_generated_pairs(generated, "hazelnut", ["crack", "hole"])
    seg = GeneratedSegmentationDataset(good, pairs, 64, normal_ratio=0.5)
    perlin = PerlinSegmentationDataset(good, good, 64, normal_ratio=0.5)
    for ds in (seg, perlin):
        items = [ds[(0, seed)] for seed in range(16)]
        again = [ds[(5, seed)] for seed in range(16)]  # the index does not matter, the seed does
        for a, b in zip(items, again):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
            assert a["image"].shape == (3, 64, 64) and a["mask"].shape == (1, 64, 64)
            assert 0 <= a["image"].min() and a["image"].max() <= 1
        n_anomalous = sum(bool(it["mask"].any()) for it in items)
        assert 0 < n_anomalous < 16
    cls = GeneratedClassificationDataset(pairs, 64)
    assert cls.defects == ["crack", "hole"] and len(cls) == 6
    assert [cls[(i, 0)]["label"] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    with pytest.raises(TypeError, match="StepSampler"):
        seg[0]


def test_mixed_source_draws_both_kinds_by_seed(mvtec, generated):
    """--source both: every item is exactly the generated or the Perlin dataset's item for a derived seed, the
    choice depends only on the item seed, and both sources occur (share 1/2)."""
    good = good_images(mvtec, "hazelnut")
    pairs = find_generated_pairs(generated, "hazelnut", ["crack", "hole"])
    seg = GeneratedSegmentationDataset(good, pairs, 64, normal_ratio=0.0)
    perlin = PerlinSegmentationDataset(good, good, 64, normal_ratio=0.0)
    mixed = MixedSegmentationDataset(seg, perlin)
    assert len(mixed) == len(seg) + len(perlin)
    sources = []
    for seed in range(40):
        item = mixed[(0, seed)]
        assert torch.equal(item["image"], mixed[(3, seed)]["image"])  # the seed decides, not the index
        rng = np.random.default_rng([seed, 7])
        inner = int(rng.integers(2**62))
        expected_source = "generated" if rng.random() < 0.5 else "perlin"
        expected = (seg if expected_source == "generated" else perlin)[(0, inner)]
        assert torch.equal(item["image"], expected["image"]) and torch.equal(item["mask"], expected["mask"])
        sources.append(expected_source)
    assert 10 < sources.count("generated") < 30
    with pytest.raises(ValueError, match="generated_share"):
        MixedSegmentationDataset(seg, perlin, generated_share=1.0)
