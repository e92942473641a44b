"""IC-LPIPS: a hand-checkable case, the member draw, feature caching == pairwise recomputation, the CLI."""

from __future__ import annotations

import json
import math
from itertools import combinations

import numpy as np
import pytest
import torch

from datasets.mvtec import official_train_count
from eval.ic_lpips import CallableSpace, LPIPSFeatureSpace, LPIPSRecomputeSpace, ic_lpips, nearest_centre
from losses.lpips_vgg import build_lpips_vgg


def test_hand_checkable_case():
    centres = [0.0, 10.0, 100.0, 1000.0]
    generated = [1.0, 2.0, 4.0, 9.0, 11.0, 12.0, 20.0, 90.0]
    res = ic_lpips(generated, centres, CallableSpace(lambda a, b: abs(a - b)), show_progress=False)
    # c0 = {1,2,4}: pairs 1,3,2 -> 2; c1 = {9,11,12,20}: 2,3,11,1,9,8 -> 34/6; c2 = {90}: skipped; c3 empty
    assert res.cluster_sizes == [3, 4, 1, 0]
    assert res.cluster_means[0] == pytest.approx(2.0)
    assert res.cluster_means[1] == pytest.approx(34 / 6)
    assert res.cluster_means[2] is None and res.cluster_means[3] is None
    assert res.value == pytest.approx((2.0 + 34 / 6) / 2)


def test_ties_go_to_the_last_equal_centre_as_the_official_script():
    """The official script keeps ``max_ind = k`` whenever ``dist <= min_dist``: the last minimum wins."""

    def official_assign(distances):
        min_dist, max_ind = 999999999, None
        for k, dist in enumerate(distances):
            if dist <= min_dist:
                max_ind, min_dist = k, dist
        return max_ind

    for d in ([3.0, 1.0, 1.0, 2.0], [1.0, 1.0, 1.0], [2.0, 0.5, 3.0, 0.5], [4.0]):
        assert nearest_centre(np.array(d)) == official_assign(d)
    # 5 is 5 away from both centres: the second centre gets it (argmin would give the first)
    res = ic_lpips([5.0, 5.0], [0.0, 10.0], CallableSpace(lambda a, b: abs(a - b)), show_progress=False)
    assert res.assignment == [1, 1] and res.cluster_sizes == [0, 2]


def test_member_cap_draws_a_seeded_subset():
    generated = [float(i) for i in range(1, 30)]
    space = CallableSpace(lambda a, b: abs(a - b))
    res = ic_lpips(generated, [0.0], space, cluster_size=5, seed=3, show_progress=False)
    again = ic_lpips(generated, [0.0], space, cluster_size=5, seed=3, show_progress=False)
    other = ic_lpips(generated, [0.0], space, cluster_size=5, seed=4, show_progress=False)
    assert res.member_counts == [5] and res.cluster_sizes == [29]
    # members = the first 5 of the seeded permutation
    members = [generated[i] for i in np.random.default_rng(3).permutation(29)[:5]]
    expected = np.mean([abs(a - b) for a, b in combinations(members, 2)])
    assert res.value == pytest.approx(expected)
    assert again.value == res.value and other.value != res.value


def test_no_cluster_with_two_members_is_nan():
    res = ic_lpips([1.0, 9.0], [0.0, 10.0], CallableSpace(lambda a, b: abs(a - b)), show_progress=False)
    assert math.isnan(res.value) and res.as_dict()["ic_lpips"] is None


@pytest.fixture(scope="module")
def lpips_model():
    torch.manual_seed(0)
    return build_lpips_vgg(pretrained_backbone=False)


def test_feature_cache_equals_pairwise_recomputation(lpips_model):
    torch.manual_seed(0)
    generated = list(torch.rand(9, 3, 16, 16) * 2 - 1)
    centres = list(torch.rand(2, 3, 16, 16) * 2 - 1)
    kw = dict(cluster_size=4, seed=1, batch_size=5, show_progress=False)
    cached = ic_lpips(generated, centres, LPIPSFeatureSpace(lpips_model, resolution=16), **kw)
    budget0 = ic_lpips(
        generated, centres, LPIPSFeatureSpace(lpips_model, resolution=16), cache_budget_gb=0, **kw
    )
    slow = ic_lpips(generated, centres, LPIPSRecomputeSpace(lpips_model, resolution=16), **kw)
    assert cached.assignment == slow.assignment
    assert budget0.recomputed > 0 and cached.recomputed == 0
    assert cached.value == pytest.approx(slow.value, abs=1e-6)
    assert budget0.value == pytest.approx(slow.value, abs=1e-6)
    # independent check of one cluster: mean of lpips(x, y) over its members' pairs
    c = next(i for i, m in enumerate(cached.cluster_means) if m is not None)
    ref_members = [i for i in np.random.default_rng(1).permutation(9) if cached.assignment[i] == c][:4]
    pairs = [
        float(lpips_model(generated[a][None], generated[b][None])) for a, b in combinations(ref_members, 2)
    ]
    assert cached.cluster_means[c] == pytest.approx(np.mean(pairs), abs=1e-6)


def test_pairwise_matrix_form_equals_lpips_calls(lpips_model):
    """The Gram-matrix form of all pairs equals lpips(x, y) called on each pair, in row-major order."""
    torch.manual_seed(3)
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    space = LPIPSFeatureSpace(lpips_model, resolution=32)
    got = space.pairwise_upper(space.stack(space.embed(list(x))))
    want = [float(lpips_model(x[i : i + 1], x[j : j + 1])) for i, j in combinations(range(5), 2)]
    assert got.shape == (10,)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_cli_on_tiny_assets(tiny_assets, tmp_path):
    import shutil

    from eval.compute_ic_lpips import main

    gen = tmp_path / "generate_data" / "hazelnut"
    # "generated" images: real test images of the class stand in for a model's output
    for defect in ("hole", "full"):
        (gen / defect / ("image" if defect != "full" else "")).mkdir(parents=True, exist_ok=True)
    src = sorted((tiny_assets["mvtec"] / "hazelnut" / "test").rglob("*.png"))
    for i, p in enumerate(src):
        shutil.copy(p, gen / "hole" / "image" / f"{i:04d}.png")
        shutil.copy(p, gen / "full" / f"{i:04d}.png")
    common = [
        "--mvtec_root",
        str(tiny_assets["mvtec"]),
        "--random_vgg",
        "--resolution",
        "16",
        "--device",
        "cpu",
    ]
    row = main(["--image_dir", str(gen / "full"), "--num_full_centres", "2", *common])
    assert row["class"] == "hazelnut" and row["defect"] == "full" and row["num_centres"] == 2
    summary = main(["--gen_root", str(tmp_path / "generate_data"), "--class_name", "hazelnut", *common])
    assert (gen / "ic_lpips.json").is_file() and (gen / "ic_lpips.csv").is_file()
    data = json.loads((gen / "ic_lpips.json").read_text())
    manifest = json.loads((gen / "ic_lpips.manifest.json").read_text())  # next to the result
    assert manifest["job"] == "ic_lpips" and set(manifest["inputs"]) == {"hazelnut/full", "hazelnut/hole"}
    assert {o["name"] for o in manifest["outputs"]} == {"ic_lpips.json", "ic_lpips.csv"}
    hole = next(r for r in data["per_folder"] if r["defect"] == "hole")
    n_hole = len(list((tiny_assets["mvtec"] / "hazelnut" / "test" / "hole").glob("*.png")))
    assert hole["centres"] == "official" and hole["num_centres"] == n_hole // 3  # the official script's l
    assert summary["class_average_over_defects"] == hole["ic_lpips"]
    split = main(["--image_dir", str(gen / "hole"), "--centres", "split", *common])
    assert split["num_centres"] == official_train_count(n_hole) != n_hole // 3  # 6 images: 3 vs 2
    with pytest.raises(FileNotFoundError, match="defect type 'nope'"):
        main(["--image_dir", str(gen / "hole"), "--defect", "nope", *common])
    # a set whose manifest says it mixes weights is refused unless --allow_mixed_weights
    from eval.manifest import MixedSetsError, write_manifest

    write_manifest(
        gen / "hole",
        {"class": "hazelnut", "defect": "hole", "mixed_weights": True, "earlier_weights": [{}],
         "weights": {"trained_for": {}}, "base_model": {"path": "sd", "configs": []}},
    )  # fmt: skip
    with pytest.raises(MixedSetsError, match="2 sets of weights"):
        main(["--image_dir", str(gen / "hole" / "image"), "--defect", "hole", *common])


def test_official_centres_are_the_first_third_of_the_sorted_test_images(tiny_assets, tmp_path):
    from eval.compute_ic_lpips import centre_images, parse_args

    hole = sorted((tiny_assets["mvtec"] / "hazelnut" / "test" / "hole").glob("*.png"))
    args = parse_args(["--image_dir", str(tmp_path), "--mvtec_root", str(tiny_assets["mvtec"])])
    got = centre_images(args, "hazelnut", "hole")
    # the official script reads '%03d.png' % k for k in range(len(os.listdir(test/<defect>)) // 3)
    assert got == [
        tiny_assets["mvtec"] / "hazelnut" / "test" / "hole" / f"{k:03d}.png" for k in range(len(hole) // 3)
    ]
    folder = tmp_path / "centres"
    folder.mkdir()
    for p in hole[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    args = parse_args(["--image_dir", str(tmp_path), "--centres", str(folder)])
    assert [p.name for p in centre_images(args, "hazelnut", "hole")] == [p.name for p in hole[:4]]
    with pytest.raises(SystemExit):
        parse_args(["--image_dir", str(tmp_path), "--centres", str(tmp_path / "missing")])
