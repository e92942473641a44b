"""U-REPA fine-tuning of Stable Diffusion 1.5 on cached SD-VAE latents + DINOv2 tokens.

    accelerate launch train_sd15.py --config configs/sd15_repa_A.yaml [--set key=value ...]
    accelerate launch --num_processes 2 --cpu train_sd15.py --config configs/sd15_repa_tiny.yaml

Loss: L = L_diff + lambda * (L_token + w * L_manifold) (losses/urepa.py); LoRA (or a partial full fine-tune)
on mid_block / down_blocks.3 / up_blocks.0; AdamW + warmup/cosine; EMA of the trained weights; bf16;
gradient clipping; NaN/Inf steps skipped (abort after ``train.max_consecutive_nonfinite``);
checkpoints with exact resume (``train.resume_from_checkpoint: latest``); TensorBoard scalars; sample grids.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[0]))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from datasets.sd15_aligned import SD15AlignedDataset, make_batched_loader  # noqa: E402
from losses.urepa import URepaLoss  # noqa: E402
from train.urepa.checkpoint import TrainState, save_extra_state  # noqa: E402
from train.urepa.config_schema import URepaConfig  # noqa: E402
from train.urepa.data import (  # noqa: E402
    apply_cfg_dropout,
    build_dataset,
    cfg_dropout_mask,
    dataset_metadata,
    embedding_table,
    grid_from_metadata,
)
from train.urepa.ema import ParamEMA  # noqa: E402
from train.urepa.setup import (  # noqa: E402
    build_aligned_model,
    load_scheduler_config,
    load_unet,
    load_vae,
    resolve_sd_dir,
)
from utils.checkpoint import atomic_save_state, prune_checkpoints, resolve_resume_path  # noqa: E402
from utils.config import add_config_args, load_config, save_config  # noqa: E402
from utils.logging import get_logger, progress  # noqa: E402
from utils.seed import seed_everything  # noqa: E402

logger = get_logger("train_sd15")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss or gradient."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="U-REPA on SD-1.5: train a LoRA (or whitelisted blocks) with token + manifold alignment "
        "to cached DINOv2 tokens. All settings live in the YAML config; override any of them with --set.",
    )
    add_config_args(parser)
    return parser.parse_args(argv)


def _flat_scalars(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TensorBoard hparams accept only scalars/strings."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_scalars(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """Per-step, per-rank RNG for noise, timesteps and CFG dropout: a resumed run draws the same numbers."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1))
    return g


def resolve_dims(cfg: dict[str, Any], dataset: Any) -> tuple[int, tuple[int, int]]:
    """DINO token width and grid: config values if given, else the cache metadata."""
    model_cfg = cfg["model"]
    meta = dataset_metadata(dataset)
    D = model_cfg.get("D") or (meta or {}).get("D")
    grid = model_cfg.get("grid") or (grid_from_metadata(meta) if meta else None)
    if not D or not grid:
        raise ValueError("cannot determine DINO token width/grid: set model.D and model.grid or use a cache")
    if isinstance(grid, int):
        grid = (grid, grid)
    if meta and model_cfg.get("D") and int(meta["D"]) != int(model_cfg["D"]):
        raise ValueError(
            f"model.D={model_cfg['D']} but the DINO cache {cfg['data'].get('dino_dir')} has D={meta['D']}"
        )
    return int(D), (int(grid[0]), int(grid[1]))


@torch.no_grad()
def save_sample_grid(accelerator, model, ema, cfg, sd_dir, table, step, out_dir: Path) -> None:
    """EMA-weight samples for the configured classes, one PNG per call (main process only)."""
    from train.urepa.sampling import decode_latents, make_scheduler, sample_latents
    from utils.images import save_image_grid

    scfg = cfg["sampling"]
    unwrapped = accelerator.unwrap_model(model)
    vae = load_vae(sd_dir).to(accelerator.device).eval()
    classes = torch.tensor(cfg["train"]["sample_classes"], dtype=torch.long)
    if int(classes.max()) >= table.shape[0] - 1:
        raise ValueError(
            f"train.sample_classes {classes.tolist()} out of range for {table.shape[0] - 1} classes"
        )
    cond = table[classes].to(accelerator.device, torch.float32)
    null = table[-1].to(accelerator.device, torch.float32)
    scheduler = make_scheduler(load_scheduler_config(sd_dir), scfg["sampler"], cfg["loss"]["prediction"])
    size = int(unwrapped.unet.config.sample_size)
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    was_training = unwrapped.training
    unwrapped.eval()
    with ema.average_parameters(unwrapped), accelerator.autocast():
        latents = sample_latents(
            lambda x, t, c: unwrapped(x, t, c, return_tokens=False)[0],
            cond,
            null,
            scheduler,
            (unwrapped.unet.config.in_channels, size, size),
            num_steps=int(scfg["num_steps"]),
            cfg_scale=float(scfg["cfg_scale"]),
            guidance_low=float(scfg["guidance_low"]),
            guidance_high=float(scfg["guidance_high"]),
            generator=g,
        )
    images = decode_latents(vae, latents.float())
    unwrapped.train(was_training)
    path = save_image_grid(images, out_dir / "samples" / f"step_{step:07d}.png", nrow=min(len(classes), 8))
    logger.info(f"sample grid -> {path}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides, schema=URepaConfig)
    tcfg, lcfg, ocfg = cfg["train"], cfg["loss"], cfg["optim"]
    out_dir = Path(cfg["output_dir"])
    accum = tcfg.get("gradient_accumulation_steps", 1)
    if not isinstance(accum, int) or accum < 1:
        raise ValueError(f"train.gradient_accumulation_steps must be an integer >= 1, got {accum!r}")

    accelerator = Accelerator(
        # Without a GPU accelerate only forms a multi-process (gloo) group when told it runs on CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=tcfg["mixed_precision"],
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=int(cfg["seed"])),
    )
    seed_everything(int(cfg["seed"]) + accelerator.process_index)

    # ---- data ---------------------------------------------------------------------------------------------
    align = float(lcfg["align_coeff"]) > 0
    dataset = build_dataset(
        cfg["data"],
        tuple(cfg["model"]["align_layers"]) if align else (),
        cfg["model"].get("D"),
        int(cfg["seed"]),
    )
    D, grid = resolve_dims(cfg, dataset)
    table = embedding_table(dataset, cfg["data"].get("clip_embeddings"))
    cfg["model"]["D"], cfg["model"]["grid"] = D, list(grid)  # resolved: checkpoints are self-describing
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    batch_size = int(tcfg["batch_size"])
    if len(dataset) < batch_size * accelerator.num_processes * accum:
        raise ValueError(
            f"dataset has {len(dataset)} samples, fewer than one global batch "
            f"({batch_size} x {accelerator.num_processes} processes x {accum} accumulation steps)"
        )
    loader_kwargs = dict(
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=int(cfg["data"].get("num_workers", 0)),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # the dataset's per-epoch draws (set_epoch) must reach fresh workers
    )
    if isinstance(dataset, SD15AlignedDataset):
        # Workers read whole batches straight into the batch tensors (one copy per record; measured in
        # docs/urepa_preprocessing.md). Same sampler, so accelerate shards, seeds and skips it as usual.
        loader = make_batched_loader(dataset, seed=None, compact=True, **loader_kwargs)
    else:  # data.factory datasets (tests, synthetic runs)
        loader = torch.utils.data.DataLoader(dataset, **loader_kwargs)

    # ---- model ----------------------------------------------------------------------------------------------
    sd_dir = resolve_sd_dir(cfg["model"]["pretrained"])
    unet = load_unet(sd_dir)
    sched_cfg = load_scheduler_config(sd_dir)
    model = build_aligned_model(cfg["model"], unet, D, grid, align=align, verbose=accelerator.is_main_process)
    if table.shape[-1] != unet.config.cross_attention_dim:
        raise ValueError(
            f"CLIP embeddings width {table.shape[-1]} != U-Net cross_attention_dim {unet.config.cross_attention_dim}"
        )
    from diffusers import DDPMScheduler

    alphas_cumprod = DDPMScheduler.from_config(sched_cfg).alphas_cumprod
    criterion = URepaLoss(
        alphas_cumprod,
        prediction=lcfg["prediction"],
        align_coeff=float(lcfg["align_coeff"]),
        manifold_coeff=float(lcfg["manifold_coeff"]),
        manifold_upper_only=bool(lcfg.get("manifold_upper_only", False)),
    ).to(accelerator.device)

    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(tcfg["mixed_precision"]))
    if weight_dtype is not None:
        # diffusers' LoRA-example convention: frozen weights in the compute dtype (half their memory, no
        # per-step casts under autocast); the trained parameters stay fp32 for AdamW and the EMA.
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(weight_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    mode = cfg["model"].get("finetune", "lora")
    lr = ocfg["lr"]  # null was resolved by the schema (2e-4 LoRA, 1e-4 full); 0 stays 0
    optimizer = torch.optim.AdamW(
        params,
        lr=float(lr),
        betas=tuple(ocfg["betas"]),
        weight_decay=float(ocfg["weight_decay"]),
        eps=float(ocfg["eps"]),
    )
    max_steps = int(tcfg["max_steps"])
    # AcceleratedScheduler steps the schedule once per process per optimizer step (diffusers convention).
    lr_scheduler = get_scheduler(
        ocfg["lr_scheduler"],
        optimizer=optimizer,
        num_warmup_steps=int(round(float(ocfg["warmup_ratio"]) * max_steps)) * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    ema = ParamEMA(model, decay=float(cfg["ema"]["decay"]))
    state = TrainState()
    n_trainable = sum(p.numel() for p in params)
    if accelerator.is_main_process:
        logger.info(
            f"trainable parameters: {n_trainable / 1e6:.3f}M (finetune={mode}, lr={lr}, align_layers="
            f"{list(model.align_layers)}, D={D}, grid={grid}, prediction={lcfg['prediction']})"
        )

    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    # [K+1, 77, dim] prompt table in its stored dtype (118 MB fp16 for 1000 classes) and the null row, on the
    # device once rather than copied there every step
    prompt_table = table.to(accelerator.device)
    null_embedding = prompt_table[-1].float()
    ema_device = accelerator.device
    ema.shadow = {k: v.to(ema_device) for k, v in ema.shadow.items()}
    accelerator.register_for_checkpointing(ema, state)

    def save_hook(models, weights, output_dir):
        for m in models:
            if accelerator.is_main_process:
                save_extra_state(accelerator.unwrap_model(m), ema, cfg, output_dir)
            if weights:
                weights.pop()  # the frozen U-Net is not saved; trainable_state holds what changes

    def load_hook(models, input_dir):
        from train.urepa.checkpoint import load_trainable

        while models:
            load_trainable(accelerator.unwrap_model(models.pop()), input_dir, use_ema=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    resume = resolve_resume_path(out_dir, tcfg.get("resume_from_checkpoint"))
    if resume is not None:
        accelerator.load_state(str(resume))
        logger.info(f"resumed from {resume} at step {state.step}")
    if accelerator.is_main_process:
        accelerator.init_trackers("sd15_urepa", config=_flat_scalars(cfg))

    # One optimizer step = `accum` micro-batches; an epoch's last len(loader) % accum micro-batches are dropped.
    steps_per_epoch = len(loader) // accum
    max_bad = int(tcfg["max_consecutive_nonfinite"])
    consecutive_bad = 0
    log_every = int(tcfg["log_every"])
    ckpt_every = int(tcfg["checkpointing_steps"])
    sample_every = int(tcfg.get("sample_every") or 0)
    p_drop = float(cfg["data"]["cfg_dropout"])
    seed = int(cfg["seed"])
    # Stop this invocation early (checkpointing first) without changing the schedule, for time-limited jobs.
    stop_at = tcfg.get("stop_at_step")
    running: dict[str, torch.Tensor] = {}
    last_logged: dict[str, float] = {}
    bar = progress(total=max_steps, initial=state.step, desc="train", disable=not accelerator.is_main_process)
    t_last, last_log_step = time.perf_counter(), state.step
    model.train()

    def train_step(micro_batches: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
        """Forward/backward over the micro-batches (gradients summed, DDP all-reduce on the last one only),
        then clip, AdamW, LR and EMA -- unless any loss or the gradient norm is non-finite on any rank."""
        g = step_generator(seed, state.step, accelerator.process_index, accelerator.device)
        n = len(micro_batches)
        # Random draws for the whole accumulated batch, in the order a single batch draws them: k micro-batches
        # of b see exactly the dropout, noise and timesteps of one batch of k*b (tested).
        sizes = [int(b["latent"].shape[0]) for b in micro_batches]
        total = sum(sizes)
        drop = cfg_dropout_mask(total, p_drop, g)
        noise = torch.randn((total, *micro_batches[0]["latent"].shape[1:]), generator=g, device=g.device)
        timesteps = torch.randint(0, criterion.num_train_timesteps, (total,), generator=g, device=g.device)
        out: dict[str, torch.Tensor] = {}
        all_finite = True
        start = 0
        for i, batch in enumerate(micro_batches):
            part = slice(start, start + sizes[i])
            start += sizes[i]
            latents = batch["latent"].float()
            if "prompt_index" in batch:  # compact batches: prompt rows are looked up on the device
                ehs = prompt_table[batch["prompt_index"]].float()
            else:
                ehs = batch["encoder_hidden_states"].float()
            if drop is not None:
                ehs = apply_cfg_dropout(ehs, null_embedding, p_drop, mask=drop[part])
            with accelerator.no_sync(model) if i < n - 1 else contextlib.nullcontext():
                micro = criterion(
                    model, latents, batch["dino_tokens"], ehs, noise=noise[part], timesteps=timesteps[part]
                )
                finite = accelerator.reduce(torch.isfinite(micro["loss"].detach()).float(), reduction="sum")
                # every rank agrees, or DDP would hang
                all_finite = int(finite.item()) == accelerator.num_processes
                if all_finite:
                    accelerator.backward(micro["loss"] / n)
            for k, v in micro.items():
                out[k] = out.get(k, 0.0) + v.detach() / n
            if not all_finite:
                break
        grad_norm = torch.tensor(float("nan"))
        stepped = False
        if all_finite:
            grad_norm = accelerator.clip_grad_norm_(params, float(ocfg["max_grad_norm"]))
            if torch.isfinite(grad_norm):
                optimizer.step()
                lr_scheduler.step()
                ema.update(accelerator.unwrap_model(model))
                stepped = True
        optimizer.zero_grad(set_to_none=True)
        return out, grad_norm, stepped

    while state.step < max_steps:
        epoch, step_in_epoch = divmod(state.step, steps_per_epoch)
        loader.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        skip = step_in_epoch * accum
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        micro_batches: list[dict[str, Any]] = []
        for batch in epoch_loader:
            if state.step >= max_steps:
                break
            micro_batches.append(batch)
            if len(micro_batches) < accum:
                continue
            out, grad_norm, stepped = train_step(micro_batches)
            micro_batches = []
            if stepped:
                consecutive_bad = 0
            else:
                consecutive_bad += 1
                state.skipped_steps += 1
                logger.warning(
                    f"step {state.step}: non-finite loss or gradient (loss={out['loss'].item():.4g}, "
                    f"grad_norm={float(grad_norm):.4g}); update skipped "
                    f"({consecutive_bad}/{max_bad} consecutive, {state.skipped_steps} total)"
                )
                if consecutive_bad >= max_bad:
                    accelerator.end_training()
                    raise NonFiniteLossError(
                        f"{consecutive_bad} consecutive non-finite steps (last at step {state.step}); aborting. "
                        "Check the caches for NaN, lower optim.lr, or use mixed_precision=no to debug."
                    )
            state.step += 1
            bar.update(1)
            for k, v in out.items():
                if torch.isfinite(v):
                    running[k] = running.get(k, 0.0) + v.detach().float()
            running["count"] = running.get("count", 0.0) + (1.0 if torch.isfinite(out["loss"]) else 0.0)
            if stepped:
                running["grad_norm"] = running.get("grad_norm", 0.0) + grad_norm.detach().float()

            if state.step % log_every == 0 or state.step == max_steps:
                n = max(float(running.get("count", 0.0)), 1.0)
                logs = {
                    k: float(
                        accelerator.reduce(torch.as_tensor(v, device=accelerator.device).float(), "mean")
                    )
                    / n
                    for k, v in running.items()
                    if k != "count"
                }
                dt = time.perf_counter() - t_last
                logs.update(
                    lr=lr_scheduler.get_last_lr()[0],
                    skipped_steps=state.skipped_steps,
                    steps_per_s=(state.step - last_log_step) / dt,
                )
                if accelerator.device.type == "cuda":
                    logs["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
                accelerator.log(logs, step=state.step)
                bar.set_postfix(
                    loss=f"{logs.get('loss', float('nan')):.4f}", gn=f"{logs.get('grad_norm', 0):.3f}"
                )
                last_logged = logs
                running = {}
                t_last, last_log_step = time.perf_counter(), state.step

            stopping = stop_at is not None and state.step >= stop_at
            if (ckpt_every and (state.step % ckpt_every == 0 or state.step == max_steps)) or stopping:
                path = atomic_save_state(accelerator, out_dir / f"checkpoint-{state.step}")
                if accelerator.is_main_process:
                    prune_checkpoints(out_dir, tcfg.get("checkpoints_total_limit"))
                    logger.info(f"saved {path}")
            if sample_every and state.step % sample_every == 0 and accelerator.is_main_process:
                save_sample_grid(accelerator, model, ema, cfg, sd_dir, table, state.step, out_dir)
            if stopping:
                break
        if stop_at is not None and state.step >= stop_at:
            logger.info(f"train.stop_at_step={stop_at} reached; resume with the same config to continue")
            break
    bar.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return last_logged


if __name__ == "__main__":
    main()
