"""The trained stand-in build: real formats loaded by the real code paths, caching, rebuild on changed inputs.

Built with QUICK options (a few steps per model); that the full build learns is shown by its stamp figures in
docs/replicas.md and guarded by the replicas' quick modes (tests/replicas/)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from preprocessing.digits import HOLDOUT_EVERY, load_digit_arrays
from preprocessing.standin_training import psnr, random_shift
from preprocessing.trained_assets import QUICK, BuildOptions, fingerprint, is_complete


def test_digits_split_and_range():
    train_images, train_labels = load_digit_arrays("train", 64)
    test_images, test_labels = load_digit_arrays("test", 64)
    assert len(train_images) + len(test_images) == 1797
    assert len(test_images) == -(-1797 // HOLDOUT_EVERY) == 300
    assert train_images.shape[1:] == (64, 64, 3) and train_images.dtype == np.uint8
    assert set(test_labels.tolist()) == set(range(10))
    assert train_images.max() > 200 and train_images.min() == 0  # white strokes on black


def test_psnr_closed_form():
    ref = torch.zeros(2, 3, 4, 4)
    est = torch.full_like(ref, 0.2)  # 0.1 on the [0, 1] scale -> MSE 0.01 -> 20 dB
    assert abs(psnr(ref, est) - 20.0) < 1e-4


def test_random_shift_moves_content():
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 4, 4] = 1.0
    shifted = random_shift(image, 2, torch.Generator().manual_seed(0))
    assert shifted.sum() == 1.0 and shifted.shape == image.shape


def test_quick_tree_loads_through_real_code(trained_assets_quick):
    from diffusers import StableDiffusionPipeline

    from models.digit_classifier import DigitClassifier
    from models.dinov2_encoder import DINOv2Encoder

    paths = trained_assets_quick
    stamp = json.loads(paths["stamp"].read_text())
    assert is_complete(paths["root"], QUICK)
    assert not is_complete(paths["root"], BuildOptions())  # other options -> another fingerprint
    pipe = StableDiffusionPipeline.from_pretrained(paths["sd15"])
    assert pipe.unet.config.block_out_channels == [32, 32, 64, 64]
    # The VAE's scaling factor is measured, as SD's authors set 0.18215 for theirs.
    assert pipe.vae.config.scaling_factor == stamp["figures"]["sd15"]["vae"]["scaling_factor"]
    encoder = DINOv2Encoder.from_pretrained(paths["dinov2_official"], variant="tiny14", resolution=56)
    hf = DINOv2Encoder.from_pretrained(paths["dinov2_hf"], variant="tiny14", resolution=56)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(encoder(x).patch_tokens, hf(x).patch_tokens)
    classifier = DigitClassifier.from_pretrained(paths["classifier"])
    assert classifier(x).shape == (2, 10) and classifier.features(x).shape == (2, 64)
    assert (paths["digits"] / "test" / "7").is_dir()
    assert (paths["mvtec"] / "hazelnut" / "ground_truth" / "hole").is_dir()
    assert (paths["figures"] / "sd15_samples.png").is_file()


def test_fingerprint_tracks_options():
    assert fingerprint(QUICK) != fingerprint(dataclasses.replace(QUICK, sd_steps=QUICK.sd_steps + 1))
    assert fingerprint(QUICK) == fingerprint(dataclasses.replace(QUICK))


def test_text_to_image_training_is_bit_identical_with_two_threads():
    """The build's setting (deterministic algorithms, 2 threads): two runs give the same weights bit for bit.

    Without torch.use_deterministic_algorithms, two such runs on this machine differed by ~5e-6 after 8 steps
    (scheduling-dependent accumulation in a CPU backward kernel), so rebuilt stand-ins were not reproducible."""
    from diffusers import DDPMScheduler

    from preprocessing.standin_training import train_text_to_image
    from preprocessing.tiny_sd15 import SD15_SCHEDULER_CONFIG, build_tiny_text_encoder, build_tiny_unet

    def run() -> torch.Tensor:
        unet, text_encoder = build_tiny_unet(seed=0), build_tiny_text_encoder(seed=1)
        g = torch.Generator().manual_seed(0)
        pool = (
            torch.randn(32, 4, 8, 8, generator=g),
            torch.full((32, 4, 8, 8), 0.1),
            torch.randint(0, 3, (32,)),
        )
        train_text_to_image(
            unet,
            text_encoder,
            torch.randint(0, 1000, (4, 77), generator=g),
            [pool],
            [1.0],
            DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG),
            steps=8,
            batch=64,
            lr=1e-3,
            uncond_prob=0.1,
            uncond_index=3,
            seed=5,
        )
        return torch.cat([p.flatten() for p in [*unet.parameters(), *text_encoder.parameters()]])

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    try:
        first, second = run(), run()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert torch.equal(first, second)
