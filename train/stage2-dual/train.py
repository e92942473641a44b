"""Stage 2 (dual): dual-interrelated LoRA U-Net on one defect type's few-shot split (+ DINOv2 loss).

    accelerate launch train/stage2-dual/train.py --mvtec_name hazelnut --mvtec_anamaly_name hole \
        --pretrained_model_name_or_path models/stable-diffusion-v1-5 --instance_data_dir datasets/mvtec_ad \
        --output_dir all_generate/hazelnut/stage2-hole-dual --instance_prompt_blend "a vfx with sks" \
        --instance_prompt_fg "sks" --resolution 512 --train_batch_size 4 --learning_rate 2e-5 \
        --max_train_steps 8000 --resume_from_checkpoint all_generate/hazelnut/stage1-full/checkpoint-5000 \
        --rank 32 --train_text_encoder --use_dinov2_loss --dinov2_loss_weight 0.1 --dinov2_model_name vitb14 \
        --dinov2_loss_type l2 --dinov2_feature_layers 3 6 9 11

Each sample is a pair sharing flips and timestep: blend = the anomalous image with the blend prompt, fg =
image x mask (grey elsewhere, --fg_background) with the fg prompt; independent noise per branch (one noise
for both with --dual_mode shared, the seed's stage 2). Starting from a stage-1 checkpoint copies its LoRA
into both branch sets (and its text-encoder LoRA); the interaction modules start as the identity
(--interaction_init zero), the step count continues from the stage-1 step. Writes checkpoint-<step>/ and the final
dual weights (dual_unet.safetensors, text_encoder_lora.safetensors, dual_config.json) in --output_dir;
load them with ``models.dual_lora_io.load_dual_unet``.

``--bcm --bcm_fg_mask_dir DIR``: DualAnoDiff's background-compensation variant (bcm-dual-interrelated_diff):
each pair also carries its image's background (foreground masks from DIR), which conditions the blend branch's
self-attention through a write/read U-Net pass (models/bcm_reference_attention.py; docs/anomaly_training.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import copy

import torch
import torch.nn.functional as F

from datasets.mvtec import MVTecAnomalyPairDataset
from losses.dinov2_perceptual import DINOv2TargetCache
from models.dual_lora import DUAL_CONFIG_NAME, DualLoRAUNet
from models.dual_lora_io import (
    add_text_encoder_lora,
    load_dual_weights,
    load_text_encoder_lora,
    read_dual_config,
    save_dual_weights,
)
from train.anomaly.args import parse, stage2_parser
from train.anomaly.components import (
    LORA_WEIGHTS_NAME,
    encode_prompt,
    load_sd_components,
    read_stage1_lora,
    tokenize,
)
from train.anomaly.diffusion import (
    encode_images,
    noisy_and_target,
    sample_noise,
    sample_pair_noise,
    sample_timesteps,
)
from train.anomaly.loop import make_optimizer, run_stage
from train.anomaly.model_cards import write_stage2_card
from train.core import (
    core_config_from_args,
    make_accelerator,
    make_lr_scheduler,
    prepare_model,
    to_channels_last,
    weight_dtype_of,
)
from utils.checkpoint import checkpoint_step, find_latest_checkpoint
from utils.cli import run_cli
from utils.logging import get_logger

logger = get_logger("stage2-dual")


def is_stage2_dir(path: Path) -> bool:
    return (path / DUAL_CONFIG_NAME).is_file()


def is_stage1_dir(path: Path) -> bool:
    return (path / LORA_WEIGHTS_NAME).is_file() and not is_stage2_dir(path)


def resolve_start(args) -> tuple[Path | None, Path | None]:
    """(stage-1 checkpoint to initialise from, stage-2 checkpoint to resume); at most one is set."""
    out = Path(args.output_dir)
    value = args.resume_from_checkpoint
    latest = find_latest_checkpoint(out)
    latest2 = latest if latest is not None and is_stage2_dir(latest) else None
    if not value:
        if latest2 is not None:
            logger.warning(
                "%s holds stage-2 checkpoints but no --resume_from_checkpoint was given: starting from "
                "the base model (pass --resume_from_checkpoint latest to continue)",
                out,
            )
        return None, None
    if value == "latest":
        if latest2 is None:
            logger.warning(
                "no stage-2 checkpoint in %s: starting from the base model without stage-1 LoRA", out
            )
        return None, latest2
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such directory")
    if is_stage2_dir(path):
        return None, path
    if not is_stage1_dir(path):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {path} is neither a stage-1 checkpoint ({LORA_WEIGHTS_NAME}) nor a stage-2 "
            f"one ({DUAL_CONFIG_NAME}); contents: {sorted(p.name for p in path.iterdir())}"
        )
    if latest2 is not None and not args.restart_from_stage1:
        logger.info(
            "%s already holds stage-2 checkpoint %s: resuming it instead of stage-1 %s "
            "(--restart_from_stage1 to start over)",
            out,
            latest2.name,
            path,
        )
        return None, latest2
    return path, None


def main(argv: list[str] | None = None) -> int:
    args = parse(stage2_parser(), argv)
    stage1_ckpt, stage2_ckpt = resolve_start(args)
    # the core resumes stage-2 checkpoints only; a stage-1 checkpoint initialises the LoRA (below)
    resume = str(stage2_ckpt) if stage2_ckpt is not None else None
    if (
        resume is None
        and args.resume_from_checkpoint
        and find_latest_checkpoint(Path(args.output_dir)) is None
    ):
        # resume asked for, nothing to resume yet: a fresh start (the core's "latest" without a checkpoint), also
        # over the losses.jsonl of a run killed before its first checkpoint, which the core would otherwise refuse
        resume = "latest"
    cfg = core_config_from_args(
        args,
        "stage2-dual",
        resume_from_checkpoint=resume,
        overwrite_output_dir=args.overwrite_output_dir or args.restart_from_stage1,
    )
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    dataset = MVTecAnomalyPairDataset(
        args.instance_data_dir,
        args.mvtec_name,
        args.mvtec_anomaly_name,
        args.resolution,
        split_rule=args.split_rule,
        flip=args.flip,
        resize_mode=args.resize_mode,
        fg_background=args.fg_background,
        max_pixels=args.max_image_pixels,
        min_size=args.min_image_size,
        mask_size_mismatch=args.mask_size_mismatch,
    )
    logger.info(
        "%s/%s: %d training pairs, %d held out (split rule %s); flips %s, resize %s, fg background %s",
        args.mvtec_name,
        args.mvtec_anomaly_name,
        len(dataset),
        len(dataset.held_out),
        args.split_rule,
        dataset.flip,
        args.resize_mode,
        args.fg_background,
    )
    if args.bcm:  # DualAnoDiff's background compensation: each pair also carries its image's background
        from datasets.bcm_background import BackgroundPairDataset

        dataset = BackgroundPairDataset(
            dataset,
            args.bcm_fg_mask_dir,
            args.mvtec_name,
            args.mvtec_anomaly_name,
            args.resolution,
            resize_mode=args.resize_mode,
            max_pixels=args.max_image_pixels,
        )
        logger.info("background compensation: foreground masks from %s", args.bcm_fg_mask_dir)
    comps = load_sd_components(args.pretrained_model_name_or_path)
    unet, text_encoder, vae, noise_scheduler = (
        comps.unet,
        comps.text_encoder,
        comps.vae,
        comps.noise_scheduler,
    )
    weight_dtype = weight_dtype_of(accelerator)

    # ---- what to start from
    start_step = stage_start = 0
    te_lora_state = None
    if stage2_ckpt is not None:
        dual_cfg = read_dual_config(stage2_ckpt)
        for key, flag in (
            ("dual_mode", args.dual_mode),
            ("rank", args.rank),
            ("interaction_preset", args.interaction_preset),
            ("interaction_reduction", args.interaction_reduction),
        ):
            if dual_cfg[key] != flag:
                raise SystemExit(
                    f"error: checkpoint {stage2_ckpt} was trained with {key}={dual_cfg[key]!r}, "
                    f"this run asks for {flag!r}"
                )
        if bool(dual_cfg.get("background_compensation")) != args.bcm:
            raise SystemExit(
                f"error: checkpoint {stage2_ckpt} was trained {'without' if args.bcm else 'with'} --bcm; "
                "pass the same --bcm setting to resume it"
            )
        stage_start = int(dual_cfg.get("stage_start_step", 0))
        te_lora = bool(dual_cfg.get("text_encoder_lora"))
        if args.train_text_encoder and not te_lora:
            raise SystemExit(f"error: {stage2_ckpt} has no text-encoder LoRA; drop --train_text_encoder")
    else:
        te_lora = args.train_text_encoder
    model_class = DualLoRAUNet
    if args.bcm:
        from models.bcm_reference_attention import BCMDualLoRAUNet as model_class
    dual = model_class(
        unet,
        rank=args.rank,
        dual_mode=args.dual_mode,
        interaction_reduction=args.interaction_reduction,
        interaction_preset=args.interaction_preset,
        interaction_init=args.interaction_init,
    )
    if stage1_ckpt is not None:
        unet_sd, te_lora_state = read_stage1_lora(stage1_ckpt)
        n = dual.load_single_lora(unet_sd)
        te_lora = te_lora or bool(te_lora_state)
        start_step = stage_start = (
            checkpoint_step(stage1_ckpt) if stage1_ckpt.name.startswith("checkpoint-") else 0
        )
        logger.info(
            "stage-1 LoRA from %s copied into %s (%d layers); starting at step %d",
            stage1_ckpt,
            "both branch sets" if args.dual_mode == "interrelated" else "the shared set",
            n,
            start_step,
        )
    if te_lora:
        # rank of the stage-1 text-encoder LoRA if there is one, else --rank
        te_rank = next((v.shape[0] for k, v in (te_lora_state or {}).items() if "lora_A" in k), args.rank)
        add_text_encoder_lora(text_encoder, int(te_rank))
        if te_lora_state:
            load_text_encoder_lora(text_encoder, te_lora_state)
        for p in text_encoder.parameters():
            p.requires_grad_(False)
        if args.train_text_encoder:
            for name, p in text_encoder.named_parameters():
                p.requires_grad_("lora_" in name)
            if args.gradient_checkpointing:
                text_encoder.gradient_checkpointing_enable()
    if args.max_train_steps <= start_step and stage2_ckpt is None:
        raise SystemExit(
            f"error: --max_train_steps {args.max_train_steps} counts on from the stage-1 step "
            f"{start_step}; pass a larger value (the seed uses 5000 -> 8000)"
        )
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    dual.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    trainable = [dual] + ([text_encoder] if args.train_text_encoder else [])
    if weight_dtype != torch.float32:
        from diffusers.training_utils import cast_training_params

        cast_training_params(trainable, dtype=torch.float32)
    for p in dual.parameters():
        p.requires_grad_(False)
    lora_params = [
        p
        for layer in dual.lora_layers().values()
        for p in list(layer.lora_A.parameters()) + list(layer.lora_B.parameters())
    ]
    inter_params = list(dual.interactions.parameters())
    bcm_params = list(dual.compensations.parameters()) if args.bcm else []
    te_params = (
        [p for n_, p in text_encoder.named_parameters() if "lora_" in n_] if args.train_text_encoder else []
    )
    params = lora_params + inter_params + bcm_params + te_params
    for p in params:
        p.requires_grad_(True)
    prepare_model(dual, cfg)  # throughput options: --channels_last, --compile model
    to_channels_last(vae, cfg)

    perceptual = perceptual_fg = None
    if args.use_dinov2_loss:
        from train.anomaly.perceptual import build_perceptual_term

        perceptual = build_perceptual_term(args, vae, noise_scheduler, device)
        if args.dinov2_on_fg:
            perceptual_fg = copy.copy(perceptual)  # same DINO and decoder, its own target cache
            perceptual_fg.cache = DINOv2TargetCache(perceptual.loss) if perceptual.cache is not None else None

    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    groups = [{"params": lora_params, "lr": lr, "name": "lora"}]
    if inter_params:
        groups.append(
            {"params": inter_params, "lr": args.interaction_learning_rate or lr, "name": "interaction"}
        )
    if bcm_params:  # the reference trains them with the LoRA's learning rate
        groups.append({"params": bcm_params, "lr": lr, "name": "background_compensation"})
    if te_params:
        groups.append({"params": te_params, "lr": lr, "name": "text_encoder_lora"})
    optimizer = make_optimizer(groups, args)
    lr_scheduler = make_lr_scheduler(
        args.lr_scheduler,
        optimizer,
        warmup_steps=args.lr_warmup_steps,
        max_steps=args.max_train_steps - stage_start,
        num_processes=accelerator.num_processes,
    )

    extra = {
        "stage_start_step": stage_start,
        "mvtec_name": args.mvtec_name,
        "mvtec_anomaly_name": args.mvtec_anomaly_name,
        "instance_prompt_blend": args.instance_prompt_blend,
        "instance_prompt_fg": args.instance_prompt_fg,
        "resolution": args.resolution,
        "fg_background": args.fg_background,
        "pretrained_model_name_or_path": str(args.pretrained_model_name_or_path),
        "stage1_checkpoint": str(stage1_ckpt) if stage1_ckpt else None,
    }
    if args.bcm:  # generation defaults (eval/generate.py reads the good images' backgrounds from them)
        extra.update(instance_data_dir=str(args.instance_data_dir), bcm_fg_mask_dir=str(args.bcm_fg_mask_dir))

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_dual_weights(
                accelerator.unwrap_model(dual_p),
                accelerator.unwrap_model(text_encoder) if te_lora else None,
                output_dir,
                extra=extra,
            )
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            models.pop()
        load_dual_weights(accelerator.unwrap_model(dual_p), text_encoder if te_lora else None, input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    if args.train_text_encoder:
        dual_p, text_encoder, optimizer, lr_scheduler = accelerator.prepare(
            dual, text_encoder, optimizer, lr_scheduler
        )
    else:
        dual_p, optimizer, lr_scheduler = accelerator.prepare(dual, optimizer, lr_scheduler)

    ids_blend = tokenize(comps.tokenizer, args.instance_prompt_blend).to(device)
    ids_fg = tokenize(comps.tokenizer, args.instance_prompt_fg).to(device)
    fixed = None
    if not args.train_text_encoder:
        with torch.no_grad():
            fixed = (encode_prompt(text_encoder, ids_blend), encode_prompt(text_encoder, ids_fg))

    def step_fn(batch, gen):
        pixels = batch["pixel_values"].to(device)
        fg_pixels = batch["fg_values"].to(device)
        b = pixels.shape[0]
        lat_b = encode_images(vae, pixels, gen)
        lat_f = encode_images(vae, fg_pixels, gen)
        t = sample_timesteps(b, noise_scheduler.config.num_train_timesteps, gen, device)  # shared by the pair
        noise_b, noise_f = sample_pair_noise(lat_b, lat_f, gen, shared=args.dual_mode == "shared")
        noisy_b, tgt_b = noisy_and_target(noise_scheduler, lat_b, noise_b, t)
        noisy_f, tgt_f = noisy_and_target(noise_scheduler, lat_f, noise_f, t)
        if fixed is not None:
            e_b, e_f = fixed
        else:
            e_b, e_f = encode_prompt(text_encoder, ids_blend), encode_prompt(text_encoder, ids_fg)
        bcm = {}
        if args.bcm:  # the background, unscaled latents, noised to the pair's timestep (RefOnlyNoisedUNet)
            from models.bcm_reference_attention import encode_condition, noised_condition

            cond = encode_condition(vae, batch["condition_values"].to(device), gen)
            bcm["condition"] = noised_condition(noise_scheduler, cond, sample_noise(cond, gen), t)
        pred_b, pred_f = dual_p(noisy_b, noisy_f, t, e_b.expand(b, -1, -1), e_f.expand(b, -1, -1), **bcm)
        mse_b = F.mse_loss(pred_b.float(), tgt_b.float())
        mse_f = F.mse_loss(pred_f.float(), tgt_f.float())
        loss = 0.5 * (mse_b + mse_f)  # = MSE over the concatenated [blend; fg] batch
        logs = {"loss_mse": loss.detach(), "loss_mse_blend": mse_b.detach(), "loss_mse_fg": mse_f.detach()}
        idx, flips = batch["index"].tolist(), batch["flip"].tolist()
        if perceptual is not None:
            d_b, dl = perceptual(pred_b, noisy_b, t, pixels, idx, flips, target_latents=lat_b, generator=gen)
            dino = d_b
            logs["loss_dinov2_blend"] = d_b.detach()
            logs.update({f"{k}_blend" if k.startswith("dinov2_layer") else k: v for k, v in dl.items()})
            if perceptual_fg is not None:
                d_f, _ = perceptual_fg(
                    pred_f, noisy_f, t, fg_pixels, idx, flips, target_latents=lat_f, generator=gen
                )
                logs["loss_dinov2_fg"] = d_f.detach()
                dino = 0.5 * (d_b + d_f)
            loss = loss + args.dinov2_loss_weight * dino
            logs["loss_dinov2"] = dino.detach()
        return loss, logs

    def save_final():
        save_dual_weights(
            accelerator.unwrap_model(dual_p),
            accelerator.unwrap_model(text_encoder) if te_lora else None,
            args.output_dir,
            extra=extra,
        )
        from models.dual_lora_io import export_branch_loras  # per-branch diffusers LoRA files (issue 11)

        branch_files = export_branch_loras(
            accelerator.unwrap_model(dual_p),
            accelerator.unwrap_model(text_encoder) if te_lora else None,
            args.output_dir,
        )
        write_stage2_card(args, args.output_dir, [p.name for p in branch_files.values()])  # README.md
        logger.info("final dual weights in %s", args.output_dir)

    def validate(step):
        if not accelerator.is_main_process:
            return
        import contextlib

        from train.anomaly.validation import validate_stage2

        model = accelerator.unwrap_model(dual_p)
        condition = contextlib.nullcontext()
        if args.bcm:  # validation samples on the training images' backgrounds (generation: good images')
            from models.bcm_reference_attention import background_condition_for_sampling

            n = args.num_validation_images
            pixels = (
                torch.stack([dataset.backgrounds[i % len(dataset)] for i in range(n)]).float() / 127.5 - 1
            )
            source = background_condition_for_sampling(
                vae,
                noise_scheduler,
                pixels,
                [args.seed + i for i in range(n)],
                args.validation_guidance_scale > 1,
            )
            condition = model.conditioned(source)
        with condition:
            path = validate_stage2(
                accelerator,
                args,
                model,
                accelerator.unwrap_model(text_encoder),
                vae,
                comps.tokenizer,
                noise_scheduler,
                step,
            )
        logger.info("validation samples: %s", path)

    run_stage(
        accelerator,
        args,
        cfg,
        dataset=dataset,
        step_fn=step_fn,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        params=params,
        train_modules=[dual_p] + ([text_encoder] if args.train_text_encoder else []),
        save_final=save_final,
        validate=validate,
        start_step=stage_start,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)  # user errors (paths, values): exit code 2 and a message, no traceback
