"""FID/sFID math against closed forms, the missing-Inception error, and a tiny end-to-end evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval.alignment import svcca_score
from eval.fid import feature_stats, frechet_distance


def test_frechet_distance_two_gaussians_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    # diagonal covariances: ||mu1-mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-6)
    # rotating both covariances by the same orthogonal matrix leaves the distance unchanged
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    rotated = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-5)


def test_feature_stats_are_clean_fids():
    x = np.random.default_rng(1).normal(size=(37, 6)).astype(np.float32)
    mu, sigma = feature_stats(x)
    np.testing.assert_array_equal(mu, np.mean(x, axis=0))  # clean-fid: np.mean / np.cov(rowvar=False)
    np.testing.assert_array_equal(sigma, np.cov(x, rowvar=False))
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(x[:1])


def test_svcca_detects_shared_signal():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200, 4))
    x = z @ rng.normal(size=(4, 12)) + 0.01 * rng.normal(size=(200, 12))
    y = z @ rng.normal(size=(4, 16)) + 0.01 * rng.normal(size=(200, 16))
    assert svcca_score(x, y, k=4) > 0.99
    assert svcca_score(x, rng.normal(size=(200, 16)), k=4) < 0.35


def test_missing_inception_is_a_clear_error(tmp_path):
    from eval.evaluate_sd15 import main
    from utils.cli import UserError

    ckpt = tmp_path / "run" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    missing = tmp_path / "nope" / "inception-2015-12-05.pt"
    with pytest.raises(UserError, match="nope"):  # checked with the other inputs, before any model loads
        main(
            [
                "--checkpoints",
                str(ckpt),
                "--out_dir",
                str(tmp_path / "eval"),
                "--ref_dir",
                str(tmp_path),
                "--inception_path",
                str(missing),
            ]
        )


def test_evaluate_tiny_checkpoint_end_to_end(tmp_path, tiny_assets, fast_sqrtm):
    """Train 1 step on synthetic data, then sample + FID/sFID (random clean-fid Inception) + plot + grids."""
    from accelerate.state import AcceleratorState, GradientState

    import train_sd15
    from eval.evaluate_sd15 import main
    from tests.urepa.fake_data import make_dataset

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    clip = tmp_path / "clip.pt"
    torch.save(make_dataset().clip_embeddings, clip)
    cfg = str(__import__("pathlib").Path(__file__).with_name("tiny_test.yaml"))
    run = tmp_path / "run"
    train_sd15.main(
        [
            "--config",
            cfg,
            "--set",
            f"output_dir={run}",
            f"model.pretrained={tiny_assets['sd15']}",
            "train.max_steps=1",
            "train.checkpointing_steps=1",
            f"data.clip_embeddings={clip}",
        ]
    )
    out = tmp_path / "eval"
    summary = main(
        [
            "--checkpoints",
            str(run / "checkpoint-1"),
            "--out_dir",
            str(out),
            "--num_samples",
            "4",
            "--num_steps",
            "2",
            "--batch_size",
            "4",
            "--ref_dir",
            str(tiny_assets["imagenet"] / "ILSVRC/Data/CLS-LOC/val"),
            "--num_ref",
            "6",
            "--stats_cache",
            str(tmp_path / "stats"),
            "--inception_path",
            "random",
            "--grid_classes",
            "0",
            "1",
        ]
    )
    res = json.loads((out / "run" / "checkpoint-1.json").read_text())
    manifest = json.loads((out / "run" / "checkpoint-1.manifest.json").read_text())
    names = {f["name"] for f in manifest["inputs"]["checkpoint"]["weights"]["files"]}
    assert manifest["job"] == "evaluate_sd15" and "ema_state.safetensors" in names
    assert (
        res["step"] == 1 and np.isfinite(res["fid"]) and np.isfinite(res["sfid"]) and res["weights"] == "ema"
    )
    assert summary["results"][0]["fid"] == res["fid"] and res["fid_mode"] == "clean"
    assert (out / "fid_vs_step.png").is_file() and (out / "comparison_grid.png").is_file()
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 1
