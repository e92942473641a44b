"""Generate normal images (stage 1) or anomaly image/fg/mask triplets (stage 2) for evaluation.

Stage 1 (stock pipeline + the stage-1 LoRA; writes ``<output_root>/<class>/full/NNNN.png``):

    python eval/generate.py stage1 --pretrained_model_name_or_path models/stable-diffusion-v1-5 \
        --lora_dir all_generate/hazelnut/stage1-full --mvtec_name hazelnut --num_images 500

Stage 2 (both branches denoised jointly with the interaction modules active; writes
``<output_root>/<class>/<defect>/{image,fg,mask}/NNNN.png``, the mask extracted from fg by
models/mask_extraction.py):

    python eval/generate.py stage2 --pretrained_model_name_or_path models/stable-diffusion-v1-5 \
        --weights_dir all_generate/hazelnut/stage2-hole-dual --mvtec_name hazelnut --mvtec_anomaly_name hole

Flags of both stages include ``--output_root`` (default generate_data), ``--num_images``, ``--num_inference_steps``,
``--guidance_scale``, ``--scheduler``, ``--seed`` and ``--batch_size``; ``stage1 --help`` / ``stage2 --help`` list all.

Presets (explicit flags override them): ``--preset fast`` (default: DDIM, 50 steps, guidance 2.5) and
``--preset official`` (DualAnoDiff's inference: PNDM, 100 steps, guidance 2.5, prompts "a vfx with sks" /
"sks", unconditional prompt ""); script/inference/*.sh use ``official``. ``--preset official_bcm``: its
background-compensation inference (PNDM, 50 steps, guidance 2.0, 1.2 for screw) for weights trained with
``--bcm``, which sample on the backgrounds of ``train/good`` images (``--bcm_fg_mask_dir``, ``--bcm_data_dir``).

Resumable and shardable (eval/sharding.py): sample ``i`` uses its own seed ``--seed + i`` and always falls in
batch ``i // --batch_size``; each file is written atomically as soon as its batch is made; a batch with a
missing file is made again whole and only the missing files are written. So an interrupted run continues with
the bytes an uninterrupted run would write, and ``accelerate launch`` on N processes / nodes (batches dealt out
round-robin) writes the same files as one process:

    accelerate launch --config_file configs/accelerate/8gpu_ddp.yaml eval/generate.py stage2 ...

Every set gets a ``manifest.json`` (eval/manifest.py): the weight files with sha256, base model, prompts,
sampler, steps, guidance, seed range, all flags, repo commit. Resuming a set with other weights is refused
unless ``--allow_mixed_weights``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os

import torch

from datasets.mvtec import FG_BACKGROUNDS
from eval.manifest import record_generation
from eval.sharding import batches_for_this_process, process_state, sample_device
from models.dual_lora_io import LEGACY_FG_BACKGROUND
from models.dual_sampling import BCM_DEFAULT_GUIDANCE, BCM_REFERENCE_GUIDANCE, PRESETS, sample_pairs
from models.dual_sampling import encode_prompts as encode_prompts
from models.mask_extraction import MaskParams, extract_mask, mask_to_image
from models.schedulers import SCHEDULERS, make_scheduler
from utils.checkpoint import atomic_write
from utils.cli import raise_if_problems, run_cli
from utils.images import to_pil
from utils.logging import get_logger, progress

logger = get_logger("generate")
# The presets (PRESETS, models/dual_sampling.py) set what a flag not given defaults to; "official" is DualAnoDiff's
# inference script, whose two prompts and empty negative prompt are these:
PROMPTS = {"prompt": "a vfx", "prompt_blend": "a vfx with sks", "prompt_fg": "sks", "negative_prompt": ""}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pretrained_model_name_or_path",
        default=os.environ.get("MODEL_NAME", "models/stable-diffusion-v1-5"),
        help="SD-1.5 base: local diffusers directory or hub id in the local HF cache",
    )
    p.add_argument("--mvtec_name", required=True, help="class name, e.g. hazelnut (output subfolder)")
    p.add_argument("--output_root", default="generate_data", help="root of the generated data")
    p.add_argument(
        "--num_images", type=int, default=500, help="images (stage 1) or pairs (stage 2) to have in total"
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="fast",
        help="defaults of --scheduler/--num_inference_steps/--guidance_scale: fast = ddim, 50, 2.5; "
        "official = DualAnoDiff's inference (pndm, 100, 2.5); official_bcm = its BCM inference (pndm, 50, "
        "2.0; screw 1.2)",
    )
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="sampler (default: the preset's)")
    p.add_argument(
        "--num_inference_steps", type=int, default=None, help="sampling steps (default: the preset's)"
    )
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="classifier-free guidance scale, 1 = off (default: the preset's, 2.5)",
    )
    p.add_argument("--negative_prompt", default=PROMPTS["negative_prompt"], help="unconditional prompt")
    p.add_argument("--seed", type=int, default=0, help="sample i is drawn with seed + i")
    p.add_argument("--batch_size", type=int, default=4, help="samples per denoising batch")
    p.add_argument(
        "--resolution", type=int, default=None, help="output size (default: the U-Net's native size)"
    )
    p.add_argument(
        "--device",
        default=None,
        help="torch device of a one-process run (default: cuda if available, else cpu); under accelerate "
        "launch every process uses its own GPU",
    )
    p.add_argument(
        "--allow_mixed_weights",
        action="store_true",
        help="resume a set that earlier runs made with other weights (refused by default; recorded in the "
        "set's manifest.json)",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="fp32",
        help="model dtype (fp16 on GPU); passed to from_pretrained as dtype=, which diffusers >= 0.42.1 "
        "(requirements.txt) applies",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    s1 = sub.add_parser("stage1", help="normal images with the stage-1 LoRA")
    _add_common(s1)
    s1.add_argument(
        "--lora_dir",
        required=True,
        help="stage-1 --output_dir (diffusers LoRA, pytorch_lora_weights.safetensors)",
    )
    s1.add_argument("--prompt", default=PROMPTS["prompt"], help="stage-1 instance prompt")
    s2 = sub.add_parser("stage2", help="anomaly image/fg/mask triplets with the dual LoRA model")
    _add_common(s2)
    s2.add_argument("--weights_dir", required=True, help="stage-2 --output_dir or a checkpoint-<step>/ in it")
    s2.add_argument(
        "--mvtec_anomaly_name",
        "--mvtec_anamaly_name",
        dest="mvtec_anomaly_name",
        required=True,
        help="defect type, e.g. hole (output subfolder)",
    )
    s2.add_argument(
        "--prompt_blend",
        default=PROMPTS["prompt_blend"],
        help="blend-branch prompt (stage-2 --instance_prompt_blend)",
    )
    s2.add_argument(
        "--prompt_fg", default=PROMPTS["prompt_fg"], help="fg-branch prompt (stage-2 --instance_prompt_fg)"
    )
    s2.add_argument(
        "--fg_background",
        choices=tuple(FG_BACKGROUNDS),
        default=None,
        help="mask extraction: the fg background the model was trained with (default: the weights' "
        f"dual_config.json; {LEGACY_FG_BACKGROUND} for weights that predate the flag)",
    )
    s2.add_argument(
        "--mask_sigma", type=float, default=MaskParams.sigma, help="mask extraction: Gaussian sigma (px)"
    )
    s2.add_argument(
        "--mask_threshold", type=float, default=None, help="mask extraction: fixed threshold (default Otsu)"
    )
    s2.add_argument(
        "--mask_min_area_fraction",
        type=float,
        default=MaskParams.min_area_fraction,
        help="mask extraction: drop components smaller than this fraction of the image",
    )
    s2.add_argument(
        "--bcm_fg_mask_dir",
        default=None,
        help="weights trained with --bcm: foreground masks of the good images, <dir>/<class>/good/<file> "
        "(default: the training run's --bcm_fg_mask_dir, from dual_config.json)",
    )
    s2.add_argument(
        "--bcm_data_dir",
        default=None,
        help="weights trained with --bcm: MVTec root whose <class>/train/good images give the backgrounds "
        "(default: the training run's --instance_data_dir)",
    )
    s2.add_argument(
        "--bcm_background_every",
        type=int,
        default=None,
        help="weights trained with --bcm: consecutive samples per background (default: the reference's 50; "
        "10 for screw)",
    )
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.preset == "official_bcm" and args.guidance_scale is None:
        args.guidance_scale = BCM_REFERENCE_GUIDANCE.get(args.mvtec_name, BCM_DEFAULT_GUIDANCE)
    if args.num_images < 1 or args.num_inference_steps < 1 or args.batch_size < 1:
        p.error("--num_images, --num_inference_steps and --batch_size must be >= 1")
    if args.guidance_scale < 1.0:
        p.error("--guidance_scale must be >= 1 (1 disables guidance)")
    return args


def _save_png(image, path: Path) -> None:
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")


def my_batches(args: argparse.Namespace, state, done, folders: list[Path]) -> list[list[int]]:
    """This process's share of the fixed batches that still miss a file (eval/sharding.py)."""
    batches, existing = batches_for_this_process(args.num_images, args.batch_size, done, state, folders)
    if existing and state.is_main_process:
        logger.info("resuming: %d of %d already exist", existing, args.num_images)
    return batches


# ---------------------------------------------------------------------------------------------- stage 1


def resolve_base_model(args: argparse.Namespace) -> Path:
    from utils.weights import resolve_hf_path, sd15_how_to_get

    required = ("model_index.json",)
    if args.stage == "stage2":  # what models/dual_lora_io.py:load_dual_unet reads
        required = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer")
    return resolve_hf_path(
        args.pretrained_model_name_or_path, "Stable Diffusion 1.5 base model", sd15_how_to_get(), required
    )


def check_inputs(args: argparse.Namespace) -> None:
    """Every missing input at once, before a model is loaded (UserError -> exit code 2 under run_cli)."""
    from models.dual_lora import DUAL_CONFIG_NAME
    from utils.weights import MissingWeightsError

    problems = []
    try:
        resolve_base_model(args)
    except MissingWeightsError as err:
        problems.append(err)
    if args.stage == "stage1" and not Path(args.lora_dir).is_dir():
        problems.append(
            f"stage-1 LoRA not found: --lora_dir {args.lora_dir} is not a directory. Train it with "
            "bash script/train/train_stage1-full.sh (its --output_dir)."
        )
    if args.stage == "stage2" and not (Path(args.weights_dir) / DUAL_CONFIG_NAME).is_file():
        problems.append(
            f"stage-2 weights not found: {Path(args.weights_dir) / DUAL_CONFIG_NAME} does not exist. Pass the "
            "stage-2 --output_dir (or a checkpoint-<step>/ in it) of bash script/train/train_stage2-dual.sh."
        )
    elif args.stage == "stage2":
        problems.extend(_bcm_problems(args))
    raise_if_problems(problems, f"{args.stage}: cannot start")


def _bcm_sources(args: argparse.Namespace, config: dict) -> tuple[str | None, str | None]:
    """(MVTec root, foreground-mask dir) of a background-compensation model: flags, else the training run's."""
    return (
        args.bcm_data_dir or config.get("instance_data_dir"),
        args.bcm_fg_mask_dir or config.get("bcm_fg_mask_dir"),
    )


def _bcm_problems(args: argparse.Namespace) -> list:
    """What a background-compensation (--bcm) model lacks to sample: the good images and their masks."""
    from datasets.bcm_background import good_background_paths
    from models.dual_lora import read_dual_config

    config = read_dual_config(args.weights_dir)
    if not config.get("background_compensation"):
        return []
    root, masks = _bcm_sources(args, config)
    if root is None or masks is None:
        return [
            f"{args.weights_dir} was trained with background compensation (--bcm): pass --bcm_data_dir (MVTec "
            "root with <class>/train/good) and --bcm_fg_mask_dir (masks <dir>/<class>/good/<file>)"
        ]
    try:
        good_background_paths(root, args.mvtec_name, masks)
    except FileNotFoundError as err:
        return [err]
    return []


def load_stage1_pipeline(args: argparse.Namespace):
    from diffusers import StableDiffusionPipeline

    base = resolve_base_model(args)
    # dtype= (not the deprecated torch_dtype=): accepted by every diffusers that requirements.txt allows; a
    # test checks that fp16 is really applied.
    pipe = StableDiffusionPipeline.from_pretrained(
        base,
        dtype=DTYPES[args.dtype],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(args.lora_dir))
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device)


def run_stage1(args: argparse.Namespace, state) -> Path:
    out_dir = Path(args.output_root) / args.mvtec_name / "full"
    batches = my_batches(args, state, lambda i: (out_dir / f"{i:04d}.png").is_file(), [out_dir])
    if not batches:
        state.wait_for_everyone()
        logger.info("nothing to do: %d images in %s", args.num_images, out_dir)
        return out_dir
    pipe = load_stage1_pipeline(args)
    size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    for idx in progress(batches, desc="stage1", unit="batch", disable=not state.is_local_main_process):
        gens = [torch.Generator("cpu").manual_seed(args.seed + i) for i in idx]
        images = pipe(
            [args.prompt] * len(idx),
            negative_prompt=[args.negative_prompt] * len(idx),
            height=size,
            width=size,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            generator=gens,
        ).images
        for i, img in zip(idx, images):
            if not (out_dir / f"{i:04d}.png").is_file():  # a resumed batch: its existing files stay
                _save_png(img, out_dir / f"{i:04d}.png")
    state.wait_for_everyone()
    logger.info("stage 1: %d images in %s", args.num_images, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------- stage 2


def run_stage2(args: argparse.Namespace, state) -> Path:
    from models.bcm_reference_attention import sampling_condition
    from models.dual_lora_io import load_dual_unet

    out = Path(args.output_root) / args.mvtec_name / args.mvtec_anomaly_name
    dirs = {k: out / k for k in ("image", "fg", "mask")}

    # The mask is written last, so its presence means the whole triplet is there.
    def done(i: int) -> bool:
        return all((d / f"{i:04d}.png").is_file() for d in dirs.values())

    batches = my_batches(args, state, done, list(dirs.values()))
    if not batches:
        state.wait_for_everyone()
        logger.info("nothing to do: %d triplets in %s", args.num_images, out)
        return out
    components = load_dual_unet(
        args.pretrained_model_name_or_path, args.weights_dir, args.device, DTYPES[args.dtype]
    )
    background = args.fg_background or components["config"].get("fg_background", LEGACY_FG_BACKGROUND)
    logger.info("mask extraction on a %s fg background", background)
    params = MaskParams(
        background=background,
        sigma=args.mask_sigma,
        threshold=args.mask_threshold,
        min_area_fraction=args.mask_min_area_fraction,
    )
    backgrounds, every = [], 1
    if components["config"].get("background_compensation"):  # DualAnoDiff's BCM variant
        from datasets.bcm_background import background_every, load_good_backgrounds

        root, mask_dir = _bcm_sources(args, components["config"])
        vae_scale = 2 ** (len(components["vae"].config.block_out_channels) - 1)
        size = args.resolution or components["dual_unet"].config.sample_size * vae_scale
        backgrounds = load_good_backgrounds(root, args.mvtec_name, mask_dir, size)
        every = background_every(args.mvtec_name, args.bcm_background_every)
        logger.info(
            "background compensation: %d good backgrounds, a new one every %d samples",
            len(backgrounds),
            every,
        )
    for idx in progress(batches, desc="stage2", unit="batch", disable=not state.is_local_main_process):
        seeds = [args.seed + i for i in idx]
        # a sample's background is chosen by its global index: the same on 1 or N processes
        with sampling_condition(components, backgrounds, idx, seeds, args.guidance_scale > 1.0, every):
            blend, fg = sample_pairs(
                components,
                args.prompt_blend,
                args.prompt_fg,
                seeds,
                args.scheduler,
                args.num_inference_steps,
                args.guidance_scale,
                args.negative_prompt,
                args.resolution,
            )
        for k, i in enumerate(idx):
            if done(i):  # a resumed batch: its complete triplets stay as they are
                continue
            fg_img = to_pil(fg[k], (-1.0, 1.0))
            _save_png(to_pil(blend[k], (-1.0, 1.0)), dirs["image"] / f"{i:04d}.png")
            _save_png(fg_img, dirs["fg"] / f"{i:04d}.png")
            _save_png(mask_to_image(extract_mask(fg_img, params)), dirs["mask"] / f"{i:04d}.png")
    state.wait_for_everyone()
    logger.info("stage 2: %d triplets in %s", args.num_images, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    check_inputs(args)
    state = process_state()
    args.device = str(sample_device(args.device, state))
    # manifest.json of the set, before any image (every process writes the same bytes atomically)
    record_generation(args, resolve_base_model(args))
    return run_stage1(args, state) if args.stage == "stage1" else run_stage2(args, state)


if __name__ == "__main__":
    run_cli(main)
