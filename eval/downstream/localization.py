"""Localization benchmark of generated anomalies: DRAEM's segmentation U-Net trained on them, tested on
the real held-out MVTec AD test images (AnomalyDiffusion / DualAnoDiff protocol).

    # trained on generated pairs (generate_data/<class>/<defect>/{image,mask}) + real train/good images
    python eval/downstream/localization.py --class_name hazelnut --mvtec_root datasets/mvtec_ad \
        --generated_root generate_data --output_dir outputs/downstream/hazelnut/localization-generated \
        --max_train_steps 6400
    # the classic baseline: the same U-Net on DRAEM-style Perlin-noise anomalies
    python eval/downstream/localization.py --source perlin --class_name hazelnut --mvtec_root datasets/mvtec_ad \
        --output_dir outputs/downstream/hazelnut/localization-perlin --max_train_steps 6400

Writes to --output_dir: model.safetensors + model_config.json, metrics.json and metrics.csv (the whole class
and each defect type: image AUROC/AP/F1-max, pixel AUROC/AP/F1-max, AU-PRO at FPR 0.3), predictions.png,
anomaly_maps/ (float maps in MVTec's evaluation layout; re-score with eval/downstream/anomaly_maps.py),
manifest.json (flags, commit, the generated sets' manifests), checkpoint-<step>/, losses.jsonl and tracker
logs. Protocol: docs/anomaly_downstream.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
from collections.abc import Callable
from typing import Any

import torch

from datasets.mvtec import SPLIT_RULES, good_images
from eval.downstream.anomaly_maps import FORMATS, save_anomaly_maps
from eval.downstream.au_pro import AU_PRO_RULES
from eval.downstream.data import (
    DEFAULT_SPLIT_RULE,
    GeneratedSegmentationDataset,
    MixedSegmentationDataset,
    PerlinSegmentationDataset,
    TestItem,
    find_generated_pairs,
    held_out_test_set,
    load_test_set,
    resolve_defects,
    texture_images,
)
from eval.downstream.metrics import (
    AU_PRO_LIMIT,
    IMAGE_SCORE_KERNEL,
    METRIC_NAMES,
    image_scores_from_maps,
    localization_metrics,
)
from eval.downstream.report import METRICS_CSV, METRICS_JSON, localization_figure, write_csv, write_json
from eval.downstream.trainer import (
    add_optimisation_args,
    check_optimisation_args,
    log_evaluation,
    train_model,
)
from eval.manifest import check_sets, evaluation_manifest, write_manifest
from losses.focal import focal_loss
from models.draem_segmentation import DiscriminativeSubNetwork, init_weights
from train.core import add_core_args, core_config_from_args, make_accelerator
from utils.cli import run_cli
from utils.logging import get_logger

logger = get_logger("downstream.localization")
SOURCES = ("generated", "perlin", "both")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_core_args(
        p,
        checkpointing_steps=1000,
        log_every=10,
        max_steps_help="Optimizer steps. The references: 200 epochs of 500 items at batch 16 = 6400.",
    )
    g = p.add_argument_group("data")
    g.add_argument("--class_name", required=True, help="MVTec AD class, e.g. hazelnut.")
    g.add_argument("--mvtec_root", default="datasets/mvtec_ad", help="MVTec AD root (holds <class>/).")
    g.add_argument(
        "--source",
        choices=SOURCES,
        default="generated",
        help="Anomalous training samples: generated pairs, DRAEM-style Perlin-noise anomalies (baseline), or "
        "both (each anomalous item is a generated pair or a Perlin anomaly with probability 1/2).",
    )
    g.add_argument(
        "--generated_root",
        default="generate_data",
        help="Generation output root: <root>/<class>/<defect>/{image,mask}/ (eval/generate.py --output_root).",
    )
    g.add_argument(
        "--defects",
        nargs="*",
        default=None,
        help="Defect types to train and test on (default: all of the class's; each needs generated pairs).",
    )
    g.add_argument(
        "--split_rule",
        choices=SPLIT_RULES,
        default=DEFAULT_SPLIT_RULE,
        help="Few-shot split the generator was trained with (datasets/mvtec.py); its training images are "
        "left out of the test set.",
    )
    g.add_argument(
        "--normal_ratio",
        type=float,
        default=0.5,
        help="Probability that a training item is a real train/good image with an empty mask (references: 0.5).",
    )
    g.add_argument(
        "--texture_dir",
        default=None,
        help="--source perlin: folder of texture images (searched recursively; DRAEM uses DTD). "
        "Default: the class's own train/good images.",
    )
    g.add_argument("--resolution", type=int, default=256, help="Train/test image side (multiple of 32).")
    g = p.add_argument_group("model and loss")
    g.add_argument("--base_width", type=int, default=64, help="U-Net base channel width (DRAEM: 64).")
    g.add_argument("--focal_gamma", type=float, default=2.0, help="Focal loss gamma (references: 2).")
    g.add_argument("--l1_weight", type=float, default=0.0, help="Weight of an L1 term |p_anomaly - mask|.")
    g.add_argument(
        "--ssim_weight", type=float, default=0.0, help="Weight of a 1 - SSIM(p_anomaly, mask) term (11x11)."
    )
    add_optimisation_args(p, batch_size=16)
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--image_score_kernel",
        type=int,
        default=IMAGE_SCORE_KERNEL,
        help="Image score = max of the anomaly map box-filtered with this odd kernel (references: 21).",
    )
    g.add_argument(
        "--f1_grid_step",
        type=float,
        default=0.0,
        help="Pixel F1-max over all thresholds (0) or over the grid 0, step, ..., 1 (references: 0.05).",
    )
    g.add_argument("--au_pro_limit", type=float, default=AU_PRO_LIMIT, help="FPR limit of AU-PRO.")
    g.add_argument(
        "--au_pro_rule",
        choices=AU_PRO_RULES,
        default="dualanodiff",
        help="AU-PRO tie rule. dualanodiff: DualAnoDiff's au_pro_util.py (score > t, FPR counted by position in "
        "the sorted normal scores: PRO stays flat through tied normal scores), the papers' numbers; mvtec: MVTec "
        "AD's official evaluation (score >= t, a tie block crossed diagonally). They differ on saturated maps.",
    )
    g.add_argument(
        "--au_pro_num_thresholds",
        type=int,
        default=None,
        help="--au_pro_rule dualanodiff: sample this many evenly spaced positions of the sorted normal scores "
        "(the reference: 100). Default: every position.",
    )
    g.add_argument("--eval_batch_size", type=int, default=8, help="Test-time batch size.")
    g.add_argument(
        "--anomaly_maps",
        choices=FORMATS,
        default="npy",
        help="Save the test anomaly maps under <output_dir>/anomaly_maps/<class>/test/<defect>/: npy (float32 at "
        "--resolution), tiff (float32 at the original image size, MVTec's evaluate_experiment.py layout; "
        "about 4 MB each at 1024 px), both, or none.",
    )
    g.add_argument(
        "--allow_mixed_weights",
        action="store_true",
        help="Use generated sets whose manifests show images of several weights, weights trained for another "
        "class/defect, or different base models (refused by default; eval/manifest.py).",
    )
    g.add_argument(
        "--num_figure_images", type=int, default=8, help="Test images in predictions.png (0: no figure)."
    )
    g.add_argument("--skip_eval", action="store_true", help="Train only.")
    g.add_argument(
        "--note",
        default="",
        help="Free text stored in metrics.json and shown in the tables/figure (e.g. that a run is a smoke test).",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_optimisation_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.resolution < 32 or args.resolution % 32:
        parser.error(
            f"--resolution must be a positive multiple of 32 (five 2x poolings), got {args.resolution}"
        )
    if args.image_score_kernel < 1 or args.image_score_kernel % 2 == 0:
        parser.error(f"--image_score_kernel must be odd and >= 1, got {args.image_score_kernel}")
    if not 0.0 <= args.f1_grid_step < 1.0:
        parser.error(f"--f1_grid_step must be in [0, 1), got {args.f1_grid_step}")
    if not 0.0 < args.au_pro_limit <= 1.0:
        parser.error(f"--au_pro_limit must be in (0, 1], got {args.au_pro_limit}")
    if args.au_pro_num_thresholds is not None and (
        args.au_pro_rule != "dualanodiff" or args.au_pro_num_thresholds < 2
    ):
        parser.error(
            "--au_pro_num_thresholds needs --au_pro_rule dualanodiff and a value >= 2 (reference: 100)"
        )
    if args.eval_batch_size < 1 or args.num_figure_images < 0:
        parser.error("--eval_batch_size must be >= 1 and --num_figure_images >= 0")
    return args


def segmentation_loss(args: argparse.Namespace) -> Callable:
    from train.dinovq.evaluate import ssim

    def loss_fn(model, batch):
        probs = model(batch["image"]).float().softmax(1)
        mask = batch["mask"]
        focal = focal_loss(probs, mask, gamma=args.focal_gamma)
        loss, logs = focal, {"loss_focal": focal.detach()}
        if args.l1_weight > 0:
            l1 = (probs[:, 1:] - mask).abs().mean()
            loss = loss + args.l1_weight * l1
            logs["loss_l1"] = l1.detach()
        if args.ssim_weight > 0:
            s = 1.0 - ssim(probs[:, 1:], mask).mean()
            loss = loss + args.ssim_weight * s
            logs["loss_ssim"] = s.detach()
        return loss, logs

    return loss_fn


@torch.no_grad()
def predict_maps(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """uint8 ``[N,3,R,R]`` -> anomaly maps ``[N,R,R]`` = softmax(logits)[:, 1], on CPU."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).float() / 255.0
        out.append(model(x).float().softmax(1)[:, 1].cpu())
    return torch.cat(out)


def _figure_rows(items: list[TestItem], n: int) -> list[int]:
    """Up to ``n`` test images, taken round-robin over the defect types and good."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.defect, []).append(i)
    order = [d for d in groups if d != "good"] + ["good"]
    rows: list[int] = []
    while len(rows) < min(n, len(items)):
        for d in order:
            if groups[d] and len(rows) < n:
                rows.append(groups[d].pop(0))
    return rows


def evaluate(
    model: torch.nn.Module,
    args: argparse.Namespace,
    items: list[TestItem],
    test_set: tuple[torch.Tensor, torch.Tensor],
    device,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Anomaly maps of the test images, the metrics per class and per defect type, and the output files."""
    images, masks = test_set
    maps = predict_maps(model, images, args.eval_batch_size, device)
    maps_dir = save_anomaly_maps(args.output_dir, args.class_name, items, maps, args.anomaly_maps)

    def metrics_of(index: list[int]) -> dict[str, float]:
        return localization_metrics(
            maps[index],
            masks[index],
            args.image_score_kernel,
            args.f1_grid_step,
            args.au_pro_limit,
            args.au_pro_rule,
            args.au_pro_num_thresholds,
        )

    good = [i for i, it in enumerate(items) if it.defect == "good"]
    defects = sorted({it.defect for it in items} - {"good"})
    results = {"all": metrics_of(list(range(len(items))))}
    for d in defects:
        results[d] = metrics_of(good + [i for i, it in enumerate(items) if it.defect == d])
    out = Path(args.output_dir)
    root = Path(args.mvtec_root)
    record = {
        "job": "localization",
        "class": args.class_name,
        "method": args.source,
        "note": args.note,
        "metrics": results,
        "n_test_images": {d: sum(it.defect == d for it in items) for d in ["good", *defects]},
        "anomaly_maps": str(maps_dir) if maps_dir else None,
        "test_images": [
            str(it.image.relative_to(root)) if it.image.is_relative_to(root) else str(it.image)
            for it in items
        ],
        "protocol": {
            "split_rule": args.split_rule,
            "resolution": args.resolution,
            "image_score_kernel": args.image_score_kernel,
            "f1_grid_step": args.f1_grid_step,
            "au_pro_limit": args.au_pro_limit,
            "au_pro_rule": args.au_pro_rule,
            "au_pro_num_thresholds": args.au_pro_num_thresholds,
            "max_train_steps": args.max_train_steps,
            "train_batch_size": args.train_batch_size,
            "base_width": args.base_width,
            "seed": args.seed,
        },
        **extra,
    }
    write_json(out / METRICS_JSON, record)
    write_csv(
        out / METRICS_CSV,
        ["scope", *METRIC_NAMES],
        [[scope, *(f"{m[k]:.6f}" for k in METRIC_NAMES)] for scope, m in results.items()],
    )
    rows = _figure_rows(items, args.num_figure_images)
    if rows:  # --num_figure_images 0: no predictions.png (seconds of matplotlib per job on a CPU)
        scores = image_scores_from_maps(maps[rows], args.image_score_kernel)
        title = f"{args.class_name}: U-Net trained on {args.source} anomalies"
        localization_figure(
            out / "predictions.png",
            images[rows],
            masks[rows].float(),
            maps[rows],
            [f"{items[i].defect}/{items[i].image.name} score {s:.3f}" for i, s in zip(rows, scores.tolist())],
            title + (f"\n{args.note}" if args.note else ""),
        )
    a = results["all"]
    logger.info(
        "%s (%s): image AUROC %.4f AP %.4f | pixel AUROC %.4f AP %.4f F1 %.4f | AU-PRO %.4f -> %s",
        args.class_name,
        args.source,
        a["image_auroc"],
        a["image_ap"],
        a["pixel_auroc"],
        a["pixel_ap"],
        a["pixel_f1_max"],
        a["au_pro"],
        out / METRICS_JSON,
    )
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Every data check runs before any training, so a bad folder fails in seconds.
    defects = resolve_defects(args.mvtec_root, args.class_name, args.defects)
    items = held_out_test_set(args.mvtec_root, args.class_name, defects, args.split_rule)
    test_set = load_test_set(items, args.resolution)  # decoded now: a bad file fails before training
    good = good_images(args.mvtec_root, args.class_name)
    train_counts: dict[str, int] = {"good": len(good)}
    set_manifests = {}
    if args.source in ("generated", "both"):
        pairs = find_generated_pairs(args.generated_root, args.class_name, defects)
        sets = {d: Path(args.generated_root) / args.class_name / d for d in defects}
        set_manifests = check_sets(sets, args.allow_mixed_weights)
        generated = GeneratedSegmentationDataset(good, pairs, args.resolution, args.normal_ratio)
        train_counts.update({d: len(p.images) for d, p in pairs.items()})
    if args.source in ("perlin", "both"):
        textures = texture_images(args.texture_dir) if args.texture_dir else good
        perlin = PerlinSegmentationDataset(good, textures, args.resolution, args.normal_ratio)
        train_counts["textures"] = len(textures)
    if args.source == "both":
        dataset = MixedSegmentationDataset(generated, perlin)
    else:
        dataset = generated if args.source == "generated" else perlin
    logger.info("training images: %s; test images: %d", train_counts, len(items))

    cfg = core_config_from_args(args, f"downstream-localization-{args.source}")
    accelerator = make_accelerator(cfg)  # seeds the global RNGs: the model below is built after
    model = DiscriminativeSubNetwork(in_channels=3, out_channels=2, base_width=args.base_width)
    init_weights(model)
    model_config = {
        "model": "DiscriminativeSubNetwork",
        "in_channels": 3,
        "out_channels": 2,
        "base_width": args.base_width,
        "resolution": args.resolution,
        "class_name": args.class_name,
        "source": args.source,
        "defects": defects,
        "split_rule": args.split_rule,
    }
    model = train_model(accelerator, args, cfg, model, dataset, segmentation_loss(args), model_config)
    try:
        if args.skip_eval or not accelerator.is_main_process:
            return {}
        extra = {"train_images": train_counts, "defects": defects}
        record = evaluate(model, args, items, test_set, accelerator.device, extra)
        out = Path(args.output_dir)
        outputs = [out / METRICS_JSON, out / METRICS_CSV, out / "model.safetensors"]
        manifest = evaluation_manifest(
            job="localization", flags=vars(args), inputs=set_manifests, outputs=outputs,
            allowed_mixed=args.allow_mixed_weights,
        )  # fmt: skip
        write_manifest(out, manifest)
        rows = [[scope, *(m[k] for k in METRIC_NAMES)] for scope, m in record["metrics"].items()]
        log_evaluation(
            accelerator,
            "eval/localization",
            ["scope", *METRIC_NAMES],
            rows,
            cfg.max_steps,
            record["metrics"]["all"],
        )
        return record
    finally:
        accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)  # DownstreamDataError / missing files: exit code 2 and a message, no traceback
