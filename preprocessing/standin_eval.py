"""Held-out evaluation of the trained stand-ins (sample class accuracy, figures): reads the saved files only.

Not part of the trained tree's fingerprint (it changes no weight): `python preprocessing/trained_assets.py
--reevaluate` reruns it on an existing tree.
"""

from __future__ import annotations

from pathlib import Path

import torch


def evaluate_standins(paths: dict[str, Path], seed: int = 0, per_class: int = 8, steps: int = 25) -> dict:
    """Class accuracy of the saved pipeline's digit samples (loaded back with from_pretrained, DDIM 25 steps,
    CFG 1 and 3, x0 never clipped as for every latent model here) and the sample / reconstruction figures."""
    from diffusers import StableDiffusionPipeline

    from models.digit_classifier import DigitClassifier
    from models.schedulers import make_scheduler
    from preprocessing.digits import digit_prompt, load_digit_arrays, sklearn_sample_crops
    from preprocessing.standin_training import to_tensor
    from utils.figures import save_labelled_grid

    pipe = StableDiffusionPipeline.from_pretrained(paths["sd15"])
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    classifier = DigitClassifier.from_pretrained(paths["classifier"])
    prompts = [digit_prompt(d) for d in range(10) for _ in range(per_class)]
    target = torch.arange(10).repeat_interleave(per_class)
    result: dict = {"samples_per_class": per_class, "sampler": f"ddim {steps} steps"}
    for guidance in (1.0, 3.0):
        images = (
            pipe(
                prompts,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
            ).images
            * 2
            - 1
        )
        with torch.no_grad():
            accuracy = float((classifier(images).argmax(1) == target).float().mean())
        result[f"sample_class_accuracy_cfg{guidance:g}"] = accuracy
    save_labelled_grid(
        images,
        paths["figures"] / "sd15_samples.png",
        ncols=per_class,
        row_labels=[str(d) for d in range(10)],
        title="Stand-in SD-1.5 samples, one row per digit prompt",
        note=f"DDIM {steps} steps, CFG 3; digit-classifier accuracy {accuracy:.2f}",
    )
    vae = pipe.vae
    digits, _ = load_digit_arrays("test")
    originals = torch.cat([to_tensor(digits[:8]), to_tensor(sklearn_sample_crops(8, seed=seed + 1))])
    with torch.no_grad():
        recon = vae.decode(vae.encode(originals).latent_dist.mean).sample
    save_labelled_grid(
        torch.cat([originals[:8], recon[:8], originals[8:], recon[8:]]),
        paths["figures"] / "vae_reconstructions.png",
        ncols=8,
        row_labels=["digits", "VAE", "photos", "VAE"],
        title="Stand-in VAE: held-out images and reconstructions",
    )
    return result
