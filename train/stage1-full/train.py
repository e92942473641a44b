"""Stage 1 (full): DreamBooth LoRA of SD-1.5 on one MVTec class's train/good images (+ DINOv2 loss).

    accelerate launch train/stage1-full/train.py --mvtec_name hazelnut \
        --pretrained_model_name_or_path models/stable-diffusion-v1-5 --instance_data_dir datasets/mvtec_ad \
        --output_dir all_generate/hazelnut/stage1-full --instance_prompt "a vfx" --resolution 512 \
        --train_batch_size 8 --learning_rate 2e-5 --max_train_steps 5000 --rank 32 --train_text_encoder \
        --use_dinov2_loss --dinov2_loss_weight 0.1 --dinov2_model_name vitb14 --dinov2_loss_type l2 \
        --dinov2_feature_layers 3 6 9 11

Writes checkpoint-<step>/ (accelerate state + pytorch_lora_weights.safetensors) and the final
pytorch_lora_weights.safetensors in --output_dir (diffusers format: ``pipe.load_lora_weights(output_dir)``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.nn.functional as F

from datasets.mvtec import MVTecGoodDataset
from train.anomaly.args import parse, stage1_parser
from train.anomaly.components import (
    add_unet_lora,
    encode_prompt,
    load_sd_components,
    load_stage1_lora_into_peft,
    save_stage1_lora,
    setup_text_encoder_lora,
    tokenize,
)
from train.anomaly.diffusion import encode_images, noisy_and_target, sample_noise, sample_timesteps
from train.anomaly.loop import make_optimizer, run_stage
from train.anomaly.model_cards import write_stage1_card
from train.core import (
    core_config_from_args,
    make_accelerator,
    make_lr_scheduler,
    prepare_model,
    to_channels_last,
    weight_dtype_of,
)
from utils.cli import run_cli
from utils.logging import get_logger

logger = get_logger("stage1-full")


def main(argv: list[str] | None = None) -> int:
    args = parse(stage1_parser(), argv)
    cfg = core_config_from_args(args, "stage1-full")
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    dataset = MVTecGoodDataset(
        args.instance_data_dir,
        args.mvtec_name,
        args.resolution,
        flip=args.flip,
        resize_mode=args.resize_mode,
        max_pixels=args.max_image_pixels,
        min_size=args.min_image_size,
    )
    logger.info("%d train/good images of %s", len(dataset), args.mvtec_name)
    comps = load_sd_components(args.pretrained_model_name_or_path)
    unet, text_encoder, vae, noise_scheduler = (
        comps.unet,
        comps.text_encoder,
        comps.vae,
        comps.noise_scheduler,
    )
    weight_dtype = weight_dtype_of(accelerator)

    add_unet_lora(unet, args.rank)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.train_text_encoder:
        setup_text_encoder_lora(text_encoder, args.rank, args.gradient_checkpointing)
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    trainable = [unet] + ([text_encoder] if args.train_text_encoder else [])
    if weight_dtype != torch.float32:
        from diffusers.training_utils import cast_training_params

        cast_training_params(trainable, dtype=torch.float32)  # LoRA weights stay fp32 under fp16/bf16
    prepare_model(unet, cfg)  # throughput options: --channels_last, --skip_lora_input_cast, --compile model
    to_channels_last(vae, cfg)
    params = [p for m in trainable for p in m.parameters() if p.requires_grad]

    perceptual = None
    if args.use_dinov2_loss:
        from train.anomaly.perceptual import build_perceptual_term

        perceptual = build_perceptual_term(args, vae, noise_scheduler, device)

    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer([{"params": params, "lr": lr, "name": "lora"}], args)
    lr_scheduler = make_lr_scheduler(
        args.lr_scheduler,
        optimizer,
        warmup_steps=args.lr_warmup_steps,
        max_steps=args.max_train_steps,
        num_processes=accelerator.num_processes,
    )

    unet_type, te_type = type(unet), type(text_encoder)

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            u = next(m for m in models if isinstance(accelerator.unwrap_model(m), unet_type))
            t = next((m for m in models if isinstance(accelerator.unwrap_model(m), te_type)), None)
            save_stage1_lora(
                accelerator.unwrap_model(u),
                accelerator.unwrap_model(t) if t is not None else None,
                output_dir,
            )
        while weights:  # the LoRA file replaces accelerate's full-model dump
            weights.pop()

    def load_hook(models, input_dir):
        u = t = None
        while models:
            m = accelerator.unwrap_model(models.pop())
            if isinstance(m, unet_type):
                u = m
            elif isinstance(m, te_type):
                t = m
        load_stage1_lora_into_peft(u, t, input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    if args.train_text_encoder:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, lr_scheduler
        )
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    input_ids = tokenize(comps.tokenizer, args.instance_prompt).to(device)
    fixed_ehs = None
    if not args.train_text_encoder:
        with torch.no_grad():
            fixed_ehs = encode_prompt(text_encoder, input_ids)

    def step_fn(batch, gen):
        pixels = batch["pixel_values"].to(device)
        b = pixels.shape[0]
        latents = encode_images(vae, pixels, gen)
        timesteps = sample_timesteps(b, noise_scheduler.config.num_train_timesteps, gen, device)
        noise = sample_noise(latents, gen)
        noisy, target = noisy_and_target(noise_scheduler, latents, noise, timesteps)
        ehs = fixed_ehs if fixed_ehs is not None else encode_prompt(text_encoder, input_ids)
        pred = unet(noisy, timesteps, encoder_hidden_states=ehs.expand(b, -1, -1), return_dict=False)[0]
        mse = F.mse_loss(pred.float(), target.float())
        logs = {"loss_mse": mse.detach()}
        loss = mse
        if perceptual is not None:
            dino, dlogs = perceptual(
                pred,
                noisy,
                timesteps,
                pixels,
                batch["index"].tolist(),
                batch["flip"].tolist(),
                target_latents=latents,
                generator=gen,
            )
            loss = loss + args.dinov2_loss_weight * dino
            logs["loss_dinov2"] = dino.detach()
            logs.update(dlogs)
        return loss, logs

    def save_final():
        save_stage1_lora(
            accelerator.unwrap_model(unet),
            accelerator.unwrap_model(text_encoder) if args.train_text_encoder else None,
            args.output_dir,
        )
        write_stage1_card(args, args.output_dir)  # README.md: Hugging Face model card
        logger.info("final LoRA: %s", Path(args.output_dir) / "pytorch_lora_weights.safetensors")

    def validate(step):
        if not accelerator.is_main_process:
            return
        from train.anomaly.validation import validate_stage1

        path = validate_stage1(
            accelerator,
            args,
            accelerator.unwrap_model(unet),
            accelerator.unwrap_model(text_encoder),
            vae,
            comps.tokenizer,
            noise_scheduler,
            step,
        )
        logger.info("validation samples: %s", path)
        for m in trainable:
            m.train()

    run_stage(
        accelerator,
        args,
        cfg,
        dataset=dataset,
        step_fn=step_fn,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        params=params,
        train_modules=[unet] + ([text_encoder] if args.train_text_encoder else []),
        save_final=save_final,
        validate=validate,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)  # user errors (paths, values): exit code 2 and a message, no traceback
