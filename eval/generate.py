"""Generate normal images (stage 1) or anomaly image/fg/mask triplets (stage 2) for evaluation.

Stage 1 (stock pipeline + the stage-1 LoRA; writes ``<output_root>/<class>/full/NNNN.png``):

    python eval/generate.py stage1 --pretrained_model_name_or_path models/stable-diffusion-v1-5 \
        --lora_dir all_generate/hazelnut/stage1-full --mvtec_name hazelnut --num_images 500

Stage 2 (both branches denoised jointly with the interaction modules active; writes
``<output_root>/<class>/<defect>/{image,fg,mask}/NNNN.png``, the mask extracted from fg by
eval/mask_extraction.py):

    python eval/generate.py stage2 --pretrained_model_name_or_path models/stable-diffusion-v1-5 \
        --weights_dir all_generate/hazelnut/stage2-hole-dual --mvtec_name hazelnut --mvtec_anomaly_name hole

Presets (explicit flags override them): ``--preset fast`` (default: DDIM, 50 steps, guidance 2.5) and
``--preset official`` (DualAnoDiff's inference: PNDM, 100 steps, guidance 2.5, prompts "a vfx with sks" /
"sks", unconditional prompt ""); script/inference/*.sh use ``official``.

Resumable: sample ``i`` uses its own seed ``--seed + i``, indices whose files exist are skipped, files are
written atomically, so an interrupted run continues with the same images an uninterrupted run would write.

Every set gets a ``manifest.json`` (eval/manifest.py): the weight files with sha256, base model, prompts,
sampler, steps, guidance, seed range, all flags, repo commit. Resuming a set with other weights is refused
unless ``--allow_mixed_weights``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402

from datasets.mvtec import FG_BACKGROUNDS  # noqa: E402
from eval.manifest import record_generation  # noqa: E402
from eval.mask_extraction import MaskParams, extract_mask, mask_to_image  # noqa: E402
from models.schedulers import SCHEDULERS, make_scheduler, step_kwargs  # noqa: E402
from utils.checkpoint import atomic_write  # noqa: E402
from utils.cli import raise_if_problems, run_cli  # noqa: E402
from utils.images import to_pil  # noqa: E402
from utils.logging import get_logger, progress  # noqa: E402

logger = get_logger("generate")
# What each preset sets when the flag is not given. "official": DualAnoDiff's inference script (the stock
# SD-1.5 pipeline's PNDM scheduler, num_inference_steps=100, guidance_scale=2.5, its two prompts, negative "").
PRESETS = {
    "fast": {"scheduler": "ddim", "num_inference_steps": 50, "guidance_scale": 2.5},
    "official": {"scheduler": "pndm", "num_inference_steps": 100, "guidance_scale": 2.5},
}
PROMPTS = {"prompt": "a vfx", "prompt_blend": "a vfx with sks", "prompt_fg": "sks", "negative_prompt": ""}
# fg background of stage-2 weights whose dual_config.json predates --fg_background (they were trained black)
LEGACY_FG_BACKGROUND = "black"
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
        "official = DualAnoDiff's inference (pndm, 100, 2.5)",
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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
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
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_images < 1 or args.num_inference_steps < 1 or args.batch_size < 1:
        p.error("--num_images, --num_inference_steps and --batch_size must be >= 1")
    if args.guidance_scale < 1.0:
        p.error("--guidance_scale must be >= 1 (1 disables guidance)")
    return args


def _save_png(image, path: Path) -> None:
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")


def pending_indices(num_images: int, done) -> list[int]:
    todo = [i for i in range(num_images) if not done(i)]
    if len(todo) < num_images:
        logger.info(
            "resuming: %d of %d already exist, %d to generate", num_images - len(todo), num_images, len(todo)
        )
    return todo


# ---------------------------------------------------------------------------------------------- stage 1


def resolve_base_model(args: argparse.Namespace) -> Path:
    from utils.weights import resolve_hf_path, sd15_how_to_get

    required = ("model_index.json",)
    if args.stage == "stage2":  # what models/dual_lora.py:load_dual_unet reads
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
    raise_if_problems(problems, f"{args.stage}: cannot start")


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


def run_stage1(args: argparse.Namespace) -> Path:
    out_dir = Path(args.output_root) / args.mvtec_name / "full"
    todo = pending_indices(args.num_images, lambda i: (out_dir / f"{i:04d}.png").is_file())
    if not todo:
        logger.info("nothing to do: %d images in %s", args.num_images, out_dir)
        return out_dir
    pipe = load_stage1_pipeline(args)
    size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    for s in progress(range(0, len(todo), args.batch_size), desc="stage1", unit="batch"):
        idx = todo[s : s + args.batch_size]
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
            _save_png(img, out_dir / f"{i:04d}.png")
    logger.info("stage 1: %d images in %s", args.num_images, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------- stage 2


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids)[0]


@torch.no_grad()
def sample_pairs(
    components: dict,
    prompt_blend: str,
    prompt_fg: str,
    seeds: list[int],
    scheduler: str = "ddim",
    num_inference_steps: int = 50,
    guidance_scale: float = 2.5,
    negative_prompt: str = "",
    resolution: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint denoising of (blend, fg) pairs; returns both decoded batches in [-1, 1], fp32.

    The stage-2 sampler of generation and of the trainers' validation. ``components``: ``dual_unet``,
    ``vae``, ``tokenizer``, ``text_encoder`` and ``scheduler`` (the model's noise scheduler, whose config
    :func:`models.schedulers.make_scheduler` turns into the sampler ``scheduler``). As DualAnoDiff's
    pipeline: the initial noise of sample ``s`` is one draw of shape ``[2, C, h, w]`` (blend, fg) from a
    generator seeded with ``s``; guidance runs the unconditional and the conditional pairs in one batch
    (``uncond + w * (cond - uncond)`` per branch); one scheduler steps both branches.
    """
    dual, vae = components["dual_unet"], components["vae"]
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    device, dtype = dual.device, dual.dtype
    b = len(seeds)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    size = resolution or dual.config.sample_size * scale
    if size % scale:
        raise ValueError(f"--resolution must be a multiple of {scale}, got {size}")
    shape = (2, dual.config.in_channels, size // scale, size // scale)
    # per-sample generators: a sample does not depend on its batch mates
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    sched = make_scheduler(scheduler, components["scheduler"].config)
    sched.set_timesteps(num_inference_steps, device=device)
    # [blend of every sample; fg of every sample]
    latents = torch.cat([torch.stack([n[0] for n in noise]), torch.stack([n[1] for n in noise])])
    latents = (latents * sched.init_noise_sigma).to(device, dtype)
    emb_b = encode_prompts(tokenizer, text_encoder, [prompt_blend], device).to(dtype).expand(b, -1, -1)
    emb_f = encode_prompts(tokenizer, text_encoder, [prompt_fg], device).to(dtype).expand(b, -1, -1)
    use_cfg = guidance_scale > 1.0
    if use_cfg:
        emb_u = encode_prompts(tokenizer, text_encoder, [negative_prompt], device).to(dtype).expand(b, -1, -1)
        emb_b, emb_f = torch.cat([emb_u, emb_b]), torch.cat([emb_u, emb_f])
    for t in sched.timesteps:
        x_b, x_f = sched.scale_model_input(latents, t).chunk(2)
        if use_cfg:
            x_b, x_f = torch.cat([x_b, x_b]), torch.cat([x_f, x_f])
        pred_b, pred_f = dual(x_b, x_f, t, emb_b, emb_f)
        if use_cfg:
            u, c = pred_b.chunk(2)
            pred_b = u + guidance_scale * (c - u)
            u, c = pred_f.chunk(2)
            pred_f = u + guidance_scale * (c - u)
        latents = sched.step(torch.cat([pred_b, pred_f]), t, latents, **step_kwargs(sched)).prev_sample
    images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    img_b, img_f = images.float().clamp(-1, 1).chunk(2)
    return img_b, img_f


def run_stage2(args: argparse.Namespace) -> Path:
    from models.dual_lora import load_dual_unet

    out = Path(args.output_root) / args.mvtec_name / args.mvtec_anomaly_name
    dirs = {k: out / k for k in ("image", "fg", "mask")}
    # The mask is written last, so its presence means the whole triplet is there.
    todo = pending_indices(
        args.num_images, lambda i: all((d / f"{i:04d}.png").is_file() for d in dirs.values())
    )
    if not todo:
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
    for s in progress(range(0, len(todo), args.batch_size), desc="stage2", unit="batch"):
        idx = todo[s : s + args.batch_size]
        blend, fg = sample_pairs(
            components,
            args.prompt_blend,
            args.prompt_fg,
            [args.seed + i for i in idx],
            args.scheduler,
            args.num_inference_steps,
            args.guidance_scale,
            args.negative_prompt,
            args.resolution,
        )
        for k, i in enumerate(idx):
            fg_img = to_pil(fg[k], (-1.0, 1.0))
            _save_png(to_pil(blend[k], (-1.0, 1.0)), dirs["image"] / f"{i:04d}.png")
            _save_png(fg_img, dirs["fg"] / f"{i:04d}.png")
            _save_png(mask_to_image(extract_mask(fg_img, params)), dirs["mask"] / f"{i:04d}.png")
    logger.info("stage 2: %d triplets in %s", args.num_images, out)
    return out


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    check_inputs(args)
    record_generation(args, resolve_base_model(args))  # manifest.json of the set, before any image
    return run_stage1(args) if args.stage == "stage1" else run_stage2(args)


if __name__ == "__main__":
    run_cli(main)
