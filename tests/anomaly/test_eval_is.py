"""Inception Score closed forms, the Inception wrapper's interface, missing weights, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eval.inception import OUTPUT_DIMS, build_random_inception, load_inception, resize_like_tf
from eval.metrics_is import inception_score
from utils.weights import MissingWeightsError


def test_uniform_probs_give_one():
    mean, std = inception_score(np.full((40, 7), 1 / 7), splits=10)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0)


def test_one_hot_distinct_classes_give_class_count():
    # 10 splits of 6 samples, each split covering 6 distinct classes -> exp(log 6) = 6
    probs = np.tile(np.eye(6), (10, 1))
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(6.0) and std == pytest.approx(0.0, abs=1e-12)


def test_matches_reference_formula_on_random_probs():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(53, 11))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(5):  # StyleGAN2-ADA's loop, written out
        part = p[i * 53 // 5 : (i + 1) * 53 // 5]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    assert inception_score(p, splits=5) == pytest.approx((np.mean(scores), np.std(scores)))


def test_bad_probs_rejected():
    with pytest.raises(ValueError, match="at least"):
        inception_score(np.full((3, 4), 0.25), splits=10)
    with pytest.raises(ValueError, match="probability"):
        inception_score(np.ones((10, 4)), splits=2)


@pytest.fixture(scope="module")
def inception():
    return build_random_inception(seed=0)


def test_inception_outputs_and_shapes(inception):
    x = torch.rand(2, 3, 64, 80) * 255
    out = inception(x, outputs=("pool", "probs", "spatial"))
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, d) for k, d in OUTPUT_DIMS.items()}
    assert torch.allclose(out["probs"].sum(1), torch.ones(2), atol=1e-5)
    # probs without the FC bias, computed independently from pool3
    fc = inception.net.fc
    assert torch.allclose(out["probs"], (out["pool"] @ fc.weight.T).softmax(1), atol=1e-6)
    with pytest.raises(ValueError, match="unknown inception outputs"):
        inception(x, outputs=("logits",))


def test_resize_like_tf_is_the_identity_at_299_and_samples_corners():
    x = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    y = resize_like_tf(x, 299)
    assert y.shape == (2, 3, 299, 299)
    assert torch.allclose(y[..., 0, 0], x[..., 0, 0])  # x_in = i * W / 299 starts at pixel 0
    z = torch.rand(1, 3, 299, 299)
    assert torch.equal(resize_like_tf(z), z)


def test_missing_inception_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path / "tmp"))
    with pytest.raises(MissingWeightsError, match="inception-2015-12-05.pt"):
        load_inception()
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_inception(tmp_path / "x.pt")


def test_loads_pytorch_fid_state_dict(tmp_path, inception):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(inception.net.state_dict(), path)
    loaded = load_inception(tmp_path)
    assert type(loaded).__name__ == "TorchvisionFIDInception"
    ours, ref = loaded.net.state_dict(), inception.net.state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a pytorch-fid"):
        load_inception(bad)


def test_cli_random_weights(tmp_path):
    from eval.compute_is import main

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i:04d}.png")
    res = main(
        [
            "--image_dir",
            str(tmp_path),
            "--splits",
            "2",
            "--batch_size",
            "2",
            "--random_weights",
            "--device",
            "cpu",
        ]
    )
    assert res["num_images"] == 2 and res["is_mean"] >= 1.0 - 1e-9
    (tmp_path / "0002.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="0002.png"):
        main(["--image_dir", str(tmp_path), "--splits", "2", "--random_weights", "--device", "cpu"])
