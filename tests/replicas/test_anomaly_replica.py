"""Learning guard for the anomaly replica (script/replicas/anomaly.py --quick): stage 1, stage 2, generation
and the downstream localization U-Net, run through the repo's entry points on the random tiny assets for a
few steps each, must learn - a silent bug (a LoRA that never reaches the sampler, a loss that never reaches
the optimizer) fails here.

Margins (stated in docs/replicas.md, anomaly): the stage-1 LoRA lowers the U-Net's denoising loss on its
training images (fixed noise and timesteps) below the base model's; the stage-1 LoRA changes the sampled
images (same seeds) by more than 0.1 grey level on average (a LoRA that never reaches the sampler: 0); every localization U-Net's focal loss falls by at
least 2x; the Perlin-trained U-Net's pixel AUROC on Perlin anomalies pasted into the held-out test/good
images (its task, on unseen images) beats the untrained U-Net's (same seed) by at least 0.1. (On the random
tiny assets the real held-out defects are not a learning signal: the random SD draws no holes.)
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    module = importlib.import_module("script.replicas.anomaly")
    out = tmp_path_factory.mktemp("anomaly_quick")
    result = module.main(["--quick", "--seeds", "0", "--out", str(out), "--threads", "1"])
    result["out"] = out
    return result


def test_stage1_lora_fits_its_images(quick):
    base = quick["reference"]["denoising_loss_base"]["train"]
    for run in quick["runs"]:
        assert run["denoising_loss_train"] < base, (run["condition"], run["denoising_loss_train"], base)


def test_stage1_lora_reaches_the_sampler(quick):
    for run in quick["runs"]:
        assert run["lora_changes_samples"] > 0.1, run


def test_localization_learns(quick):
    for run in quick["localization"]:
        assert run["loss_last"] < run["loss_first"] / 2, run
    untrained = quick["untrained_localization"][0]["perlin_probe_pixel_auroc"]
    (perlin,) = [r for r in quick["localization"] if r["source"] == "perlin"]
    assert perlin["perlin_probe_pixel_auroc"] > untrained + 0.1, (perlin, untrained)


def test_outputs_written(quick):
    out = quick["out"]
    for name in ("results.json", "results.csv", "table.md", "learning_curves.png", "samples.png"):
        assert (out / name).is_file(), name
    gen = Path(quick["runs"][0]["generate_data"]) / "hazelnut" / "hole"
    assert len(list((gen / "mask").glob("*.png"))) == 4
