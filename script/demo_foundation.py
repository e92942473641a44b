"""Foundation demo: the tiny SD-1.5 pipeline loads through diffusers and samples; the DINOv2 adapter runs
from an official-layout checkpoint on the synthetic MVTec images.

    python script/demo_foundation.py --assets .cache/tiny --out outputs/demo/foundation
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

import torch

from models.dinov2_encoder import DINOv2Encoder
from preprocessing.make_tiny_assets import ensure_tiny_assets
from utils.cli import run_cli
from utils.figures import save_labelled_grid
from utils.images import list_images, load_rgb, pil_to_tensor
from utils.seed import seed_everything


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--assets", default=".cache/tiny", help="Tiny asset directory (generated if missing)."
    )
    parser.add_argument("--out", default="outputs/demo/foundation", help="Where the sample grid is written.")
    parser.add_argument("--steps", type=int, default=2, help="Denoising steps for the sample.")
    parser.add_argument(
        "--trained_assets",
        default=None,
        help="Trained stand-in directory (preprocessing/trained_assets.py, built if missing): also sample its "
        "SD-1.5 stand-in for every prompt it was trained on (digits, hazelnut, carpet).",
    )
    args = parser.parse_args()
    seed_everything(0)
    assets = ensure_tiny_assets(args.assets)
    out = Path(args.out)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(assets["sd15"])
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a vfx", "a photo of a tench"]
    images = pipe(
        prompts,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    grid = save_labelled_grid(
        images,
        out / "sd15_samples.png",
        ncols=len(prompts),
        col_labels=[f'"{p}"' for p in prompts],
        title=f"Tiny SD-1.5 through StableDiffusionPipeline, {args.steps} steps",
        note="random weights — pictures are noise by design",
        value_range=(0, 1),
        cell_inches=1.8,
    )
    print(f"[sd15] {type(pipe.unet).__name__} sampled {tuple(images.shape)} in {args.steps} steps -> {grid}")

    encoder = DINOv2Encoder.from_pretrained(assets["dinov2_official"], variant="tiny14", resolution=56)
    paths = list_images(Path(assets["mvtec"]) / "hazelnut" / "train" / "good")[:4]
    batch = torch.stack([pil_to_tensor(load_rgb(p)) for p in paths])  # [-1, 1]
    result = encoder(batch, layers=[1, 3], return_cls=True)
    print(
        f"[dinov2] official-layout tiny14 on {len(paths)} synthetic MVTec images: grid {result.grid}, "
        f"patch tokens {tuple(result.patch_tokens.shape)}, cls {tuple(result.cls.shape)}, "
        f"intermediate layers {sorted(result.intermediate)}"
    )
    if args.trained_assets:
        sample_trained_standin(args.trained_assets, out)


def sample_trained_standin(root: str, out: Path, per_prompt: int = 6) -> Path:
    """Grid of the trained stand-in SD-1.5: one row per training prompt, DDIM 25 steps, CFG 3."""
    from diffusers import StableDiffusionPipeline

    from models.schedulers import make_scheduler
    from preprocessing.trained_assets import ensure_trained_assets, read_stamp

    trained = ensure_trained_assets(root)
    prompts = read_stamp(trained["root"])["figures"]["sd15"]["prompts"]
    pipe = StableDiffusionPipeline.from_pretrained(trained["sd15"])
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)  # x0 not clipped: latents exceed [-1, 1]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [p for p in prompts for _ in range(per_prompt)],
        num_inference_steps=25,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    grid = save_labelled_grid(
        images,
        out / "sd15_trained_samples.png",
        ncols=per_prompt,
        row_labels=[p.removeprefix("a photo of ").removeprefix("the ") for p in prompts],
        title="Trained stand-in SD-1.5 (StableDiffusionPipeline), DDIM 25 steps, CFG 3",
        note="tiny model trained offline on sklearn digits + synthetic MVTec (preprocessing/trained_assets.py)",
        value_range=(0, 1),
    )
    print(f"[sd15 trained] {len(images)} samples for {len(prompts)} prompts -> {grid}")
    return grid


if __name__ == "__main__":
    run_cli(main)
