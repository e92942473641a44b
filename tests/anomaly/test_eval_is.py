"""Inception Score: closed forms, torch-fidelity's protocol, the CLI equal to torch-fidelity's own call."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval.inception import load_inception
from eval.metrics_is import inception_score
from utils.weights import MissingWeightsError


def test_uniform_probs_give_one():
    mean, std = inception_score(np.full((40, 7), 1 / 7), splits=10)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0)


def test_one_hot_distinct_classes_give_class_count():
    # unshuffled: 10 splits of 6 samples, each split covering 6 distinct classes -> exp(log 6) = 6
    probs = np.tile(np.eye(6), (10, 1))
    mean, std = inception_score(probs, splits=10, shuffle=False)
    assert mean == pytest.approx(6.0) and std == pytest.approx(0.0, abs=1e-12)
    assert inception_score(probs, splits=10)[0] < 6.0  # shuffled chunks repeat classes


def test_unshuffled_matches_the_original_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(53, 11))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(5):  # StyleGAN2-ADA's / Salimans et al.'s loop, written out
        part = p[i * 53 // 5 : (i + 1) * 53 // 5]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    assert inception_score(p, splits=5, shuffle=False) == pytest.approx((np.mean(scores), np.std(scores)))


@pytest.mark.parametrize("n,splits", [(53, 10), (20, 3)])
def test_default_protocol_equals_torch_fidelity(n, splits):
    """torch-fidelity shuffles the rows (seed 2020) before splitting; our default does the same."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.from_numpy(np.random.default_rng(1).normal(size=(n, 11)) * 3)
    ref = isc_features_to_metric(logits, splits=splits)  # torch-fidelity's own function, its defaults
    probs = torch.softmax(logits.double(), dim=1).numpy()
    ours = inception_score(probs, splits=splits)
    assert ours == pytest.approx((ref["inception_score_mean"], ref["inception_score_std"]), rel=1e-9)
    assert inception_score(probs, splits=splits, shuffle=False)[0] != pytest.approx(ours[0], rel=1e-6)


def test_bad_probs_rejected():
    with pytest.raises(ValueError, match="at least"):
        inception_score(np.full((3, 4), 0.25), splits=10)
    with pytest.raises(ValueError, match="probability"):
        inception_score(np.ones((10, 4)), splits=2)


def test_missing_inception_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path / "tmp"))
    with pytest.raises(MissingWeightsError, match="inception-2015-12-05.pt"):
        load_inception()
    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_inception(tmp_path / "x.pt")
    from eval.compute_is import main

    _images(tmp_path / "imgs", 2)
    with pytest.raises(MissingWeightsError, match="weights-inception-2015-12-05-6726825d.pth"):
        main(["--image_dir", str(tmp_path / "imgs"), "--splits", "2", "--device", "cpu"])


def _images(folder, n, size=(32, 32), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = (rng.random((*size, 3)) * rng.uniform(60, 255)).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:04d}.png")
    return folder


def test_cli_equals_torch_fidelity_calculate_metrics(tmp_path, random_inception_state_dict):
    """compute_is on a folder == torch_fidelity.calculate_metrics(folder, isc=True) with the same weight file."""
    import torch_fidelity

    from eval.compute_is import main

    folder = _images(tmp_path / "hole" / "image", 4)  # a stage-2 <defect>/ folder: scored on image/
    ours = main(
        [
            "--image_dir",
            str(tmp_path / "hole"),
            "--inception_path",
            str(random_inception_state_dict),
            "--splits",
            "2",
            "--batch_size",
            "3",
            "--device",
            "cpu",
            "--output_json",
            str(tmp_path / "is.json"),
        ]
    )
    manifest = json.loads((tmp_path / "is.manifest.json").read_text())
    assert manifest["job"] == "inception_score" and manifest["outputs"][0]["name"] == "is.json"
    ref = torch_fidelity.calculate_metrics(
        input1=str(folder),
        isc=True,
        isc_splits=2,
        batch_size=3,  # the same batches: batched convolutions may round differently per batch size
        feature_extractor_weights_path=str(random_inception_state_dict),
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )
    assert ours["backend"] == "torch-fidelity" and ours["num_images"] == 4
    assert ours["is_mean"] == ref["inception_score_mean"] and ours["is_std"] == ref["inception_score_std"]
    assert ours["is_mean"] > 1.0


@torch.no_grad()
def test_cli_with_the_torchscript_file(tmp_path, random_inception_torchscript):
    """TorchScript weights: the file's own forward(img, no_output_bias=True), then torch-fidelity's protocol."""
    from eval.compute_is import main

    folder = _images(tmp_path / "imgs", 5, size=(24, 40))
    ours = main(
        ["--image_dir", str(folder), "--inception_path", str(random_inception_torchscript), "--splits", "2"]
        + ["--device", "cpu", "--batch_size", "2"]
    )
    net = torch.jit.load(str(random_inception_torchscript))
    probs = []
    for i in range(5):
        with Image.open(folder / f"{i:04d}.png") as img:
            x = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)[None].float()
        probs.append(net(x, no_output_bias=True)[0].double())
    expected = inception_score(
        torch.stack(probs).numpy(), splits=2
    )  # torch-fidelity's protocol (tested above)
    assert ours["backend"] == "torchscript+torch-fidelity-protocol"
    assert (ours["is_mean"], ours["is_std"]) == pytest.approx(expected, rel=1e-9)


def test_cli_errors_and_random_weights(tmp_path):
    from eval.compute_is import main

    folder = _images(tmp_path / "imgs", 2)
    res = main(["--image_dir", str(folder), "--splits", "2", "--batch_size", "2", "--random_weights"])
    assert res["num_images"] == 2 and res["is_mean"] >= 1.0 - 1e-9 and res["random_weights"]
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "0002.png")
    with pytest.raises(ValueError, match="different sizes"):
        main(["--image_dir", str(folder), "--splits", "2", "--random_weights", "--device", "cpu"])
    (folder / "0002.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="0002.png"):
        main(["--image_dir", str(folder), "--splits", "2", "--random_weights", "--device", "cpu"])
