"""Command-line flags of the two anomaly-generation trainers (stage 1 full, stage 2 dual).

Every flag of the seed commands is accepted verbatim (``--mvtec_anamaly_name`` keeps the seed's spelling),
plus the usual diffusers DreamBooth-LoRA flags and the DINOv2-loss efficiency options.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from datasets.mvtec import FG_BACKGROUNDS, FLIP_MODES, MASK_SIZE_MISMATCH, RESIZE_MODES, SPLIT_RULES
from losses.dinov2_perceptual import DEFAULT_FEATURE_LAYERS, LAYER_REDUCTIONS, LOSS_TYPES
from models.dual_lora import DUAL_MODES, INTERACTION_INITS, INTERACTION_PRESETS
from models.schedulers import SCHEDULERS
from train.anomaly.perceptual import (
    DEFAULT_CROP_SIZE,
    DEFAULT_LOSS_IMPL,
    DEFAULT_SAMPLE_FRACTION,
    DINOV2_LOSS_IMPLS,
    default_dino_resolution,
)
from train.core.config import add_core_args
from train.core.trackers import resolve_report_to
from utils.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_IMAGE_SIZE

DINOV2_CHOICES = (
    "vits14",
    "vitb14",
    "vitl14",
    "vitg14",
    "vits14_reg",
    "vitb14_reg",
    "vitl14_reg",
    "vitg14_reg",
    "tiny14",
)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def _common(parser: argparse.ArgumentParser, **core_help: str) -> None:
    add_core_args(parser, **core_help)
    g = parser.add_argument_group("model and data")
    g.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="SD-1.5 in diffusers layout: a local dir (e.g. models/stable-diffusion-v1-5) or a hub id "
        "present in the local HF cache (never downloaded).",
    )
    g.add_argument(
        "--instance_data_dir", required=True, help="MVTec AD root (holds <class>/train/good, ...)."
    )
    g.add_argument("--mvtec_name", required=True, help="MVTec class, e.g. hazelnut.")
    g.add_argument("--resolution", type=int, default=512, help="Training resolution (multiple of 8).")
    g.add_argument(
        "--flip",
        choices=FLIP_MODES,
        default=None,
        help="Random flips, probability 0.5 each (image, mask and fg get the same ones): h = horizontal, "
        "hv = horizontal and vertical, none. Default: the reference's (hv; none for cable).",
    )
    g.add_argument(
        "--resize_mode",
        choices=RESIZE_MODES,
        default="bilinear",
        help="bilinear: the reference's resize (PIL bilinear of the shorter side, as transforms.Resize); "
        "bicubic_center_crop: torch bicubic (antialiased) + centre crop, this repository's earlier resize.",
    )
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    g.add_argument(
        "--max_image_pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="An image (or mask) whose header claims more pixels is an error naming the file "
        f"(decompression-bomb guard; default {DEFAULT_MAX_PIXELS:,}, PIL's own limit).",
    )
    g.add_argument(
        "--min_image_size",
        type=int,
        default=DEFAULT_MIN_IMAGE_SIZE,
        help="A training image whose shorter side has fewer pixels is an error naming the file (upscaled to "
        f"--resolution it would be a nearly flat image; default {DEFAULT_MIN_IMAGE_SIZE}).",
    )

    g = parser.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=4, help="Batch size per device.")
    g.add_argument(
        "--learning_rate", type=float, default=1e-4, help="AdamW learning rate for the LoRA weights."
    )
    g.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the LR by batch size x accumulation x processes (diffusers convention).",
    )
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant", help="LR schedule.")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the LR schedule.")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank, i.e. scale 1).")
    g.add_argument(
        "--train_text_encoder", action="store_true", help="Also train a LoRA on the CLIP text encoder."
    )
    g.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="U-Net (and trained text encoder) gradient checkpointing: less memory, slower.",
    )
    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument(
        "--validation_prompt", default=None, help="Prompt sampled every --validation_steps (PNG grid)."
    )
    g.add_argument("--validation_steps", type=int, default=500, help="Steps between validation samples.")
    g.add_argument("--num_validation_images", type=int, default=4, help="Images per validation.")
    g.add_argument("--validation_inference_steps", type=int, default=25, help="Sampler steps for validation.")
    g.add_argument(
        "--validation_scheduler", choices=SCHEDULERS, default="dpmsolver++", help="Sampler for validation."
    )
    g.add_argument(
        "--validation_guidance_scale",
        type=float,
        default=2.5,
        help="Classifier-free guidance of the validation samples (2.5: the reference's inference value).",
    )

    g = parser.add_argument_group("DINOv2 perceptual loss")
    g.add_argument("--use_dinov2_loss", action="store_true", help="Add the DINOv2 perceptual loss.")
    g.add_argument(
        "--dinov2_loss_weight", type=float, default=0.1, help="Weight of the DINOv2 term (added to MSE)."
    )
    g.add_argument(
        "--dinov2_model_name",
        choices=DINOV2_CHOICES,
        default="vitb14",
        help="DINOv2 variant (tiny14 is the test-only toy model of the demo).",
    )
    g.add_argument("--dinov2_loss_type", choices=LOSS_TYPES, default="l2", help="Feature distance.")
    g.add_argument(
        "--dinov2_feature_layers",
        type=int,
        nargs="+",
        default=list(DEFAULT_FEATURE_LAYERS),
        help="0-based DINOv2 blocks whose L2-normalised patch tokens are compared (checked vs depth).",
    )
    g.add_argument(
        "--dinov2_weights",
        default=None,
        help="DINOv2 weights: official .pth, HF dir or hub id in the local cache; default: the "
        "torch.hub cache file dinov2_<variant>_pretrain.pth.",
    )
    g.add_argument(
        "--dinov2_resolution",
        type=int,
        default=None,
        help="DINO input side (multiple of 14). Default: 224 for --dinov2_loss_impl fast (256 tokens), 518 "
        "for reference (the seed's, 1369 tokens), 224 x crop / image for crop (112 for 256 of 512 px).",
    )
    g.add_argument(
        "--dinov2_max_timestep",
        type=int,
        default=None,
        help="Apply the loss only to samples with t < this (x0 estimates at high t are blurry); "
        "the VAE decode is skipped when no sample of the batch qualifies.",
    )
    g.add_argument(
        "--dinov2_target_cache",
        choices=("memory", "none"),
        default="memory",
        help="memory: target features per (image, flip) computed once and kept (fp16, CPU); "
        "none: recomputed from the training image every step. Never a VAE decode.",
    )
    g.add_argument(
        "--dinov2_vae_checkpointing",
        action="store_true",
        help="Gradient checkpointing in the VAE decoder used for the loss (less memory).",
    )
    g.add_argument(
        "--dinov2_tiny_vae",
        default=None,
        help="Local dir of a diffusers AutoencoderTiny (e.g. madebyollin/taesd) used to decode x0 for "
        "the loss only (much cheaper than the SD VAE decoder).",
    )
    g.add_argument(
        "--dinov2_latent_head",
        default=None,
        help="Checkpoint of a latent-space DINOv2 head (models/latent_dino_head.py): features straight "
        "from latents, no decode. Replaces the decoder + DINOv2 when given.",
    )
    g.add_argument(
        "--dinov2_loss_impl",
        choices=DINOV2_LOSS_IMPLS,
        default=DEFAULT_LOSS_IMPL,
        help="fast (default): the whole decoded x0 vs the whole training image (features cached), on a random "
        "half of the samples unless --dinov2_sample_fraction 1; crop: a random --dinov2_crop_size tile of x0 vs "
        "the same tile of the training image; reference: exactly the seed trainer's term (decode x0 and the "
        "target latent, clamped to +-10, bilinear to 518 px, every sample).",
    )
    g.add_argument(
        "--dinov2_crop_size",
        type=int,
        default=DEFAULT_CROP_SIZE,
        help="Crop side in image px for --dinov2_loss_impl crop (multiple of 8; 256 = a quarter of a 512 px "
        "image). A crop as large as the image is the full image (= fast).",
    )
    g.add_argument(
        "--dinov2_sample_fraction",
        type=float,
        default=None,
        help="p in (0, 1]: each sample enters the DINOv2 term with probability p and is weighted 1/p (same "
        "expected loss and gradient, p times the cost on average). Default: 0.5 for fast, 1 for crop and "
        "reference (every sample, like the seed).",
    )
    g.add_argument(
        "--dinov2_layer_reduction",
        choices=LAYER_REDUCTIONS,
        default="sum",
        help="How the per-layer distances combine: sum (the seed's) or mean (sum / #layers).",
    )


def stage1_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Stage 1 (full): DreamBooth LoRA of SD-1.5 on one MVTec class's train/good images, "
        "optionally with the DINOv2 perceptual loss."
    )
    _common(parser)
    parser.add_argument("--instance_prompt", default="a vfx", help="Prompt of every training image.")
    return parser


def stage2_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Stage 2 (dual): dual-interrelated LoRA on one defect type's few-shot split; blend branch = "
        "whole anomalous image, fg branch = the anomaly alone."
    )
    _common(
        parser,
        max_steps_help="Total optimizer steps, counted on from the stage-1 checkpoint's step "
        "(the seed: stage 1 5000 -> stage 2 8000).",
        resume_help="A stage-1 checkpoint dir (LoRA copied into both branches, step count continues), a "
        "stage-2 checkpoint dir (everything restored), or 'latest' (newest in --output_dir). "
        "If --output_dir already holds stage-2 checkpoints, the newest is resumed instead of "
        "the stage-1 checkpoint (so re-running the same command continues).",
    )
    parser.add_argument(
        "--mvtec_anamaly_name",
        "--mvtec_anomaly_name",
        dest="mvtec_anomaly_name",
        required=True,
        help="Defect type (test/<defect>); both spellings accepted, the first is the seed's.",
    )
    parser.add_argument(
        "--instance_prompt_blend", default="a vfx with sks", help="Prompt of the blend branch."
    )
    parser.add_argument("--instance_prompt_fg", default="sks", help="Prompt of the fg branch.")
    parser.add_argument(
        "--restart_from_stage1",
        action="store_true",
        help="Delete the stage-2 checkpoints and logs in --output_dir and start again from the stage-1 one.",
    )
    parser.add_argument(
        "--dual_mode",
        choices=DUAL_MODES,
        default="interrelated",
        help="interrelated: two LoRA sets + branch interaction (paper); shared: the seed's stage 2 "
        "(one LoRA, no interaction), for ablation.",
    )
    parser.add_argument(
        "--interaction_preset",
        choices=INTERACTION_PRESETS,
        default="official",
        help="Branch-interaction module after every attention layer. official: DualAnoDiff's (single-head "
        "attention over the 2 branches, width C, q/k/v with bias, LayerNorm eps 1e-6; ~124 M parameters on "
        "SD-1.5); light: this repository's smaller one (width C / --interaction_reduction, attn.heads heads, "
        "no q/k/v bias; ~16 M).",
    )
    parser.add_argument(
        "--interaction_init",
        choices=INTERACTION_INITS,
        default="zero",
        help="zero: output projection zero-initialised, so stage 2 starts exactly as the stage-1 model; "
        "default: PyTorch's default init everywhere (the reference's).",
    )
    parser.add_argument(
        "--interaction_reduction",
        type=int,
        default=None,
        help="light preset only: interaction q/k/v width = attention width / this (default 4).",
    )
    parser.add_argument(
        "--interaction_learning_rate",
        type=float,
        default=None,
        help="LR of the interaction modules (default: --learning_rate).",
    )
    parser.add_argument(
        "--split_rule",
        choices=SPLIT_RULES,
        default="official",
        help="Few-shot split of the N sorted defect images: official = the first N//3 (+1 if N//3 is "
        "not a multiple of 3) train, as the reference code; ceil = the first ceil(N/3). The rest is held out.",
    )
    parser.add_argument(
        "--fg_background",
        choices=tuple(FG_BACKGROUNDS),
        default="grey",
        help="fg-branch image outside the mask: grey (0 in [-1, 1], the references' image x mask) or black "
        "(-1). Generation reads it from the weights' dual_config.json for mask extraction.",
    )
    parser.add_argument(
        "--dinov2_on_fg", action="store_true", help="Apply the DINOv2 loss to the fg branch too."
    )
    parser.add_argument(
        "--mask_size_mismatch",
        choices=MASK_SIZE_MISMATCH,
        default="error",
        help="A ground-truth mask whose size differs from its image: error (naming both files), or resize "
        "it onto the image's size first so that both get the same resize and crop.",
    )
    g = parser.add_argument_group("background compensation (DualAnoDiff's BCM variant)")
    g.add_argument(
        "--bcm",
        action="store_true",
        help="Train the bcm-dual-interrelated_diff variant: the defect image with its object's foreground "
        "removed conditions the blend branch's self-attention through a write/read U-Net pass "
        "(models/bcm_reference_attention.py). Needs --bcm_fg_mask_dir.",
    )
    g.add_argument(
        "--bcm_fg_mask_dir",
        default=None,
        help="Foreground (salient-object) masks: <dir>/<class>/<defect>/<image file name> for the training "
        "images (and <dir>/<class>/good/... for generation); e.g. U-2-Net's output, white = object.",
    )
    return parser


def validate(args: argparse.Namespace) -> argparse.Namespace:
    """Value checks that argparse cannot express; errors name the flag."""
    from models.dinov2_encoder import hf_config

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise SystemExit(f"error: {msg}")

    need(
        args.resolution > 0 and args.resolution % 8 == 0,
        f"--resolution {args.resolution} must be a multiple of 8",
    )
    need(args.train_batch_size >= 1, "--train_batch_size must be >= 1")
    need(args.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1")
    need(args.max_train_steps >= 1, "--max_train_steps must be >= 1")
    if args.checkpoints_total_limit is not None:
        need(
            args.checkpoints_total_limit >= 1, "--checkpoints_total_limit must be >= 1 (omit it to keep all)"
        )
    need(args.learning_rate > 0, "--learning_rate must be > 0")
    need(args.rank >= 1, "--rank must be >= 1")
    need(args.checkpointing_steps >= 1, "--checkpointing_steps must be >= 1")
    need(args.max_image_pixels >= 1, "--max_image_pixels must be >= 1")
    need(args.min_image_size >= 1, "--min_image_size must be >= 1")
    need(args.dinov2_loss_weight >= 0, "--dinov2_loss_weight must be >= 0")
    if args.dinov2_resolution is None:
        args.dinov2_resolution = default_dino_resolution(
            args.dinov2_loss_impl, args.dinov2_crop_size, args.resolution
        )
    need(
        args.validation_guidance_scale >= 1.0,
        "--validation_guidance_scale must be >= 1 (1 disables guidance)",
    )
    need(
        args.dinov2_resolution % 14 == 0 and args.dinov2_resolution > 0,
        f"--dinov2_resolution {args.dinov2_resolution} must be a positive multiple of 14 (DINOv2 patch size)",
    )
    if args.dinov2_sample_fraction is None:
        args.dinov2_sample_fraction = DEFAULT_SAMPLE_FRACTION[args.dinov2_loss_impl]
    need(
        0.0 < args.dinov2_sample_fraction <= 1.0,
        f"--dinov2_sample_fraction {args.dinov2_sample_fraction} must be in (0, 1]",
    )
    need(
        args.dinov2_loss_impl != "reference" or args.dinov2_sample_fraction == 1.0,
        "--dinov2_loss_impl reference uses every sample like the seed: --dinov2_sample_fraction must be 1",
    )
    need(
        args.dinov2_crop_size > 0 and args.dinov2_crop_size % 8 == 0,
        f"--dinov2_crop_size {args.dinov2_crop_size} must be a positive multiple of 8 (the VAE factor)",
    )
    need(
        args.dinov2_loss_impl != "reference" or not (args.dinov2_tiny_vae or args.dinov2_latent_head),
        "--dinov2_loss_impl reference is the seed's term through the SD VAE: drop --dinov2_tiny_vae / "
        "--dinov2_latent_head, or use --dinov2_loss_impl crop|fast",
    )
    if args.dinov2_max_timestep is not None:
        need(args.dinov2_max_timestep > 0, "--dinov2_max_timestep must be > 0")
    depth = hf_config(args.dinov2_model_name).num_hidden_layers
    bad = [x for x in args.dinov2_feature_layers if not 0 <= x < depth]
    need(
        not bad,
        f"--dinov2_feature_layers {bad} out of range for DINOv2 {args.dinov2_model_name} "
        f"({depth} blocks: valid 0-based indices 0..{depth - 1})",
    )
    need(
        len(set(args.dinov2_feature_layers)) == len(args.dinov2_feature_layers),
        "--dinov2_feature_layers has duplicates",
    )
    if hasattr(args, "interaction_preset"):
        if args.interaction_preset == "official":
            need(
                args.interaction_reduction in (None, 1),
                "--interaction_reduction applies to --interaction_preset light only (official has width C)",
            )
            args.interaction_reduction = 1
        elif args.interaction_reduction is None:
            args.interaction_reduction = 4
        need(args.interaction_reduction >= 1, "--interaction_reduction must be >= 1")
    args.report_to = resolve_report_to(args.report_to)  # before any model is loaded
    if getattr(args, "bcm", False):
        need(args.bcm_fg_mask_dir is not None, "--bcm needs --bcm_fg_mask_dir (the foreground masks)")
        need(args.dual_mode == "interrelated", "--bcm needs --dual_mode interrelated (the reference's model)")
        need(
            not args.gradient_checkpointing,
            "--bcm does not support --gradient_checkpointing (its recomputation would replay the condition "
            "pass with the dual pass's routing)",
        )
    return args


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    return validate(parser.parse_args(argv))
