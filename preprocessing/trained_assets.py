"""Trained tiny stand-ins for SD-1.5, DINOv2 and a metric classifier, built offline from bundled real images.

    python preprocessing/trained_assets.py --out .cache/trained [--force] [--quick]

Data (nothing downloaded): scikit-learn's 1,797 handwritten digits (`load_digits`, upsampled 8 -> 64 px), the
repo's synthetic MVTec AD classes (hazelnut, carpet) with more samples than the test assets, and random crops
of the two photos scikit-learn bundles (`load_sample_images`: china.jpg, flower.jpg; VAE training only).

Writes under --out (each model in the format its real counterpart ships in, loaded by the repo's real code):

    data/digits/{train,test}/<digit>/NNNN.png    the digits (1,497 train / 300 test), 64 px RGB
    data/mvtec/                                    synthetic MVTec AD, 40 train/good, 20 test/good, 12 per defect
    sd15/                                          StableDiffusionPipeline (diffusers format), trained VAE,
                                                   U-Net and CLIP text encoder, SD-1.5's layout and scheduler
    dinov2/dinov2_tiny14_pretrain.pth              "DINOv2": a tiny14 ViT in the official torch.hub layout
    dinov2/hf/                                     the same weights in Hugging Face format
    classifier/                                    DigitClassifier, the independent metric feature space
    figures/                                       sample grid of the trained SD, VAE reconstructions
    TRAINED_ASSETS.json                            stamp: options, fingerprint, files, held-out figures, timings

Built in a temporary directory and renamed into place under a file lock; a stamp fingerprint (sources,
package versions, options) makes a changed input rebuild the tree. `--quick` trains every model for a few
steps (tests of the build itself; its models have not learned).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import time

from utils.cli import run_cli

STAMP_NAME = "TRAINED_ASSETS.json"
REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = (
    "preprocessing/trained_assets.py",
    "preprocessing/standin_training.py",
    "preprocessing/digits.py",
    "preprocessing/tiny_sd15.py",
    "preprocessing/clip_bpe_tokenizer.py",
    "preprocessing/synthetic_mvtec.py",
    "models/dinov2_encoder.py",
    "models/dinov2_keys.py",
    "models/digit_classifier.py",
)
PACKAGES = ("torch", "diffusers", "transformers", "safetensors", "scikit-learn", "numpy", "pillow")
MVTEC_PROMPTS = {"hazelnut": "a photo of a hazelnut", "carpet": "a photo of a carpet"}


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Everything that changes the trained weights (part of the stamp)."""

    seed: int = 0
    size: int = 64
    mvtec_train_good: int = 40
    mvtec_test_good: int = 20
    mvtec_test_defect: int = 12
    vae_steps: int = 400
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vit_steps: int = 500
    vit_batch: int = 64
    vit_lr: float = 2e-3
    classifier_steps: int = 300
    classifier_batch: int = 64
    classifier_lr: float = 3e-3
    sd_steps: int = 1500
    sd_batch: int = 64
    sd_lr: float = 1e-3
    sd_uncond_prob: float = 0.1
    threads: int = 2
    eval_per_class: int = 8  # evaluation only (not fingerprinted): samples per digit prompt
    eval_steps: int = 25  # evaluation only: DDIM steps


QUICK = BuildOptions(
    mvtec_train_good=8,
    mvtec_test_good=3,
    mvtec_test_defect=4,
    vae_steps=3,
    vit_steps=3,
    classifier_steps=3,
    sd_steps=3,
    eval_per_class=1,
    eval_steps=2,
)


def asset_paths(root: str | os.PathLike) -> dict[str, Path]:
    root = Path(root)
    return {
        "root": root,
        "digits": root / "data" / "digits",
        "mvtec": root / "data" / "mvtec",
        "sd15": root / "sd15",
        "dinov2_official": root / "dinov2" / "dinov2_tiny14_pretrain.pth",
        "dinov2_hf": root / "dinov2" / "hf",
        "classifier": root / "classifier",
        "figures": root / "figures",
        "stamp": root / STAMP_NAME,
    }


def fingerprint(options: BuildOptions) -> str:
    trained = {k: v for k, v in dataclasses.asdict(options).items() if not k.startswith("eval_")}
    digest = hashlib.sha256(json.dumps(trained, sort_keys=True).encode())
    for rel in SOURCES:
        path = REPO_ROOT / rel
        digest.update(rel.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<missing>"))
    for name in PACKAGES:
        try:
            digest.update(f"{name}={importlib.metadata.version(name)}\0".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{name}=<missing>\0".encode())
    return digest.hexdigest()[:16]


def read_stamp(root: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(root) / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_complete(root: str | os.PathLike, options: BuildOptions) -> bool:
    stamp = read_stamp(root)
    if not stamp or stamp.get("fingerprint") != fingerprint(options):
        return False
    return bool(stamp.get("files")) and all((Path(root) / f).is_file() for f in stamp["files"])


def ensure_trained_assets(
    root: str | os.PathLike = ".cache/trained", options: BuildOptions = BuildOptions(), force: bool = False
) -> dict[str, Path]:
    """asset_paths(root), building the tree first when it is missing, stale (inputs changed) or force is set."""
    from preprocessing.make_tiny_assets import _exclusive_lock

    root = Path(root).absolute()
    if not force and is_complete(root, options):
        return asset_paths(root)
    with _exclusive_lock(root.parent / f".{root.name}.lock"):
        if not force and is_complete(root, options):
            return asset_paths(root)
        if root.exists() and any(root.iterdir()) and read_stamp(root) is None:
            raise FileExistsError(f"{root} exists and holds no {STAMP_NAME}; refusing to replace it")
        from utils.checkpoint import atomic_write

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        with atomic_write(root) as tmp:
            build(tmp, options)
    return asset_paths(root)


def build(out: Path, options: BuildOptions) -> dict:
    """Build every asset into out (no caching; see ensure_trained_assets) and write the stamp.

    Runs with torch's deterministic algorithms on: with 2 threads some CPU backward kernels otherwise
    accumulate in a scheduling-dependent order, and two builds on the same machine differed by ~1e-5 in the
    U-Net's weights after a few steps (measured 2026-12-06); with them on, rebuilds are bit-identical.
    """
    import torch

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _build(out, options)
    finally:
        torch.use_deterministic_algorithms(previous)


def _build(out: Path, options: BuildOptions) -> dict:
    import torch

    from preprocessing.digits import load_digit_arrays, sklearn_sample_crops, write_digits
    from preprocessing.standin_training import to_tensor
    from preprocessing.synthetic_mvtec import MVTecCounts, write_synthetic_mvtec
    from utils.images import list_images

    torch.set_num_threads(options.threads)
    paths = asset_paths(out)
    timings: dict[str, float] = {}
    figures: dict[str, dict] = {}
    start = time.perf_counter()

    write_digits(paths["digits"], options.size)
    counts = MVTecCounts(options.mvtec_train_good, options.mvtec_test_good, options.mvtec_test_defect)
    write_synthetic_mvtec(paths["mvtec"], size=options.size, counts=counts, seed=options.seed)
    digits_train, labels_train = load_digit_arrays("train", options.size)
    digits_test, labels_test = load_digit_arrays("test", options.size)
    import numpy as np
    from PIL import Image

    mvtec_good = {
        cls: np.stack(
            [
                np.asarray(Image.open(p).convert("RGB"))
                for p in list_images(paths["mvtec"] / cls / "train/good")
            ]
        )
        for cls in MVTEC_PROMPTS
    }
    mvtec_test_good = {
        cls: np.stack(
            [
                np.asarray(Image.open(p).convert("RGB"))
                for p in list_images(paths["mvtec"] / cls / "test/good")
            ]
        )
        for cls in MVTEC_PROMPTS
    }
    data = {
        "digits_train": to_tensor(digits_train),
        "digits_test": to_tensor(digits_test),
        "labels_train": torch.from_numpy(labels_train),
        "labels_test": torch.from_numpy(labels_test),
        "mvtec_train": {c: to_tensor(v) for c, v in mvtec_good.items()},
        "mvtec_test": {c: to_tensor(v) for c, v in mvtec_test_good.items()},
        "photo_train": to_tensor(sklearn_sample_crops(256, options.size, seed=options.seed)),
        "photo_test": to_tensor(sklearn_sample_crops(64, options.size, seed=options.seed + 1)),
    }
    timings["data"] = time.perf_counter() - start

    for name, fn in (
        ("classifier", _build_classifier),
        ("dinov2", _build_dinov2),
        ("sd15", _build_sd15),
    ):
        t0 = time.perf_counter()
        figures[name] = fn(paths, data, options)
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"  {name}: {timings[name]:.0f} s {json.dumps(figures[name])}", file=sys.stderr)
    from preprocessing.standin_eval import evaluate_standins

    t0 = time.perf_counter()
    figures["sd15"]["unet"].update(
        evaluate_standins(
            paths, seed=options.seed, per_class=options.eval_per_class, steps=options.eval_steps
        )
    )
    timings["evaluation"] = round(time.perf_counter() - t0, 1)
    timings["total"] = round(time.perf_counter() - start, 1)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    stamp = {
        "fingerprint": fingerprint(options),
        "options": dataclasses.asdict(options),
        "figures": figures,
        "seconds": timings,
        "files": files,
    }
    (out / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")
    return stamp


def _build_classifier(paths: dict[str, Path], data: dict, options: BuildOptions) -> dict:
    import torch

    from models.digit_classifier import DigitClassifier
    from preprocessing.standin_training import train_classifier

    torch.manual_seed(options.seed + 10)
    model = DigitClassifier(num_classes=10)
    result = train_classifier(
        model,
        data["digits_train"],
        data["labels_train"],
        data["digits_test"],
        data["labels_test"],
        steps=options.classifier_steps,
        batch=options.classifier_batch,
        lr=options.classifier_lr,
        seed=options.seed + 11,
    )
    model.eval().requires_grad_(False)
    model.save_pretrained(paths["classifier"])
    return result


def _build_dinov2(paths: dict[str, Path], data: dict, options: BuildOptions) -> dict:
    """Supervised ViT on the 12 classes (10 digits + 2 MVTec objects); features = final-norm CLS and patch tokens.

    Supervised, not DINO's self-distillation: the replicas need a teacher whose CLS and patch tokens carry the
    class, which a label-supervised ViT learns in minutes on two cores, whereas DINO's multi-crop
    self-distillation needs far longer schedules and large batches before its features become semantic."""
    import torch

    from models.dinov2_encoder import DINOv2Encoder, save_official_checkpoint
    from preprocessing.standin_training import train_classifier

    torch.manual_seed(options.seed + 20)
    encoder = DINOv2Encoder(variant="tiny14", resolution=56, input_range="-1_1")
    encoder.model.requires_grad_(True)
    head = torch.nn.Linear(2 * encoder.embed_dim, 12)
    images = torch.cat([data["digits_train"], *data["mvtec_train"].values()])
    labels = torch.cat(
        [data["labels_train"]]
        + [torch.full((len(v),), 10 + i) for i, v in enumerate(data["mvtec_train"].values())]
    )
    test_images = torch.cat([data["digits_test"], *data["mvtec_test"].values()])
    test_labels = torch.cat(
        [data["labels_test"]]
        + [torch.full((len(v),), 10 + i) for i, v in enumerate(data["mvtec_test"].values())]
    )

    def logits(x: torch.Tensor) -> torch.Tensor:
        out = encoder(x, return_cls=True)
        return head(torch.cat([out.cls, out.patch_tokens.mean(1)], dim=1))

    module = torch.nn.ModuleDict({"encoder": encoder.model, "head": head})
    result = train_classifier(
        module,
        images,
        labels,
        test_images,
        test_labels,
        steps=options.vit_steps,
        batch=options.vit_batch,
        lr=options.vit_lr,
        seed=options.seed + 21,
        forward=logits,
        max_shift=2,
        name="dinov2 vit",
    )
    encoder.requires_grad_(False)
    save_official_checkpoint(encoder, paths["dinov2_official"])
    encoder.save_pretrained(paths["dinov2_hf"])
    return result


def _build_sd15(paths: dict[str, Path], data: dict, options: BuildOptions) -> dict:
    import torch
    from diffusers import DDPMScheduler

    from preprocessing.digits import DIGIT_WORDS, digit_prompt
    from preprocessing.standin_training import train_text_to_image, train_vae
    from preprocessing.tiny_sd15 import (
        SD15_SCHEDULER_CONFIG,
        build_tiny_text_encoder,
        build_tiny_unet,
        build_tiny_vae,
        load_tiny_tokenizer,
        save_sd15_pipeline,
    )

    torch.manual_seed(options.seed + 30)
    vae = build_tiny_vae(seed=options.seed + 31)
    mvtec_all = torch.cat(list(data["mvtec_train"].values()))
    vae, vae_figures = train_vae(
        vae,
        [data["digits_train"], mvtec_all, data["photo_train"]],
        [0.5, 0.25, 0.25],
        {
            "digits_test": data["digits_test"],
            "mvtec_test_good": torch.cat(list(data["mvtec_test"].values())),
            "photos_test": data["photo_test"],
        },
        steps=options.vae_steps,
        batch=options.vae_batch,
        lr=options.vae_lr,
        kl_weight=options.vae_kl_weight,
        seed=options.seed + 32,
    )

    tokenizer_dir, tokenizer = load_tiny_tokenizer(paths["sd15"].parent / "_tokenizer_src")
    prompts = [digit_prompt(d) for d in range(10)] + list(MVTEC_PROMPTS.values()) + [""]
    prompt_ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    scaling = vae.config.scaling_factor
    pools = []
    with torch.no_grad():
        for images, prompt_index in [(data["digits_train"], data["labels_train"])] + [
            (v, torch.full((len(v),), 10 + i)) for i, v in enumerate(data["mvtec_train"].values())
        ]:
            dist = [vae.encode(c).latent_dist for c in images.split(128)]
            pools.append(
                (
                    torch.cat([d.mean for d in dist]) * scaling,
                    torch.cat([d.std for d in dist]) * scaling,
                    prompt_index,
                )
            )
    unet = build_tiny_unet(seed=options.seed + 33)
    text_encoder = build_tiny_text_encoder(seed=options.seed + 34)
    sd_figures = train_text_to_image(
        unet,
        text_encoder,
        prompt_ids,
        pools,
        [0.8, 0.1, 0.1],
        DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        steps=options.sd_steps,
        batch=options.sd_batch,
        lr=options.sd_lr,
        uncond_prob=options.sd_uncond_prob,
        uncond_index=len(prompts) - 1,
        seed=options.seed + 35,
    )
    save_sd15_pipeline(
        paths["sd15"], vae=vae, text_encoder=text_encoder, unet=unet, tokenizer_dir=tokenizer_dir
    )
    return {"vae": vae_figures, "unet": sd_figures, "prompts": prompts[:-1], "digit_words": list(DIGIT_WORDS)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path(".cache/trained"), help="output directory (default: %(default)s)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date tree exists")
    parser.add_argument(
        "--quick", action="store_true", help="a few steps per model (tests of the build; not trained)"
    )
    parser.add_argument(
        "--reevaluate",
        action="store_true",
        help="rerun only the evaluation (sample accuracy, figures) on an up-to-date tree and update its stamp; "
        "the evaluation code (preprocessing/standin_eval.py) is not part of the fingerprint: it changes no weight",
    )
    args = parser.parse_args(argv)
    options = QUICK if args.quick else BuildOptions()
    start = time.perf_counter()
    if args.reevaluate:
        if not is_complete(args.out, options):
            parser.exit(
                2,
                f"error: {args.out} holds no up-to-date trained tree; build it first (without --reevaluate)\n",
            )
        from preprocessing.standin_eval import evaluate_standins

        stamp = read_stamp(args.out)
        stamp["figures"]["sd15"]["unet"].update(
            evaluate_standins(
                asset_paths(args.out),
                seed=options.seed,
                per_class=options.eval_per_class,
                steps=options.eval_steps,
            )
        )
        (Path(args.out) / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")
        print(json.dumps(stamp["figures"]["sd15"]["unet"], indent=1))
        return 0
    was_complete = not args.force and is_complete(args.out, options)
    paths = ensure_trained_assets(args.out, options, force=args.force)
    stamp = read_stamp(paths["root"])
    if was_complete:
        print(
            f"trained assets: up to date in {args.out} (built in {stamp['seconds']['total']:.0f} s)",
            file=sys.stderr,
        )
    else:
        print(f"trained assets: built in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(json.dumps(stamp["figures"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
