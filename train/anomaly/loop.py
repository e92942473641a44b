"""What both anomaly stages share on top of the training core: data stream, AdamW, the core task.

Everything random in a step (which images, their flips, VAE posterior sample, noise, timesteps) comes from
the core's per-step generator and the position-seeded :class:`~train.core.StepSampler`, so a run resumed
from ``checkpoint-k`` repeats the uninterrupted run's losses from step k+1 on.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from datasets.mvtec import collate
from train.core import (
    CoreConfig,
    Optim,
    StepContext,
    StepSampler,
    Task,
    loader_kwargs,
    make_adamw,
    run_training,
)


def make_dataloader(
    dataset: Dataset, args: argparse.Namespace, rank: int, world: int, start_micro: int
) -> DataLoader:
    """Endless loader of ``(index, flip seed)`` items for this rank, starting at micro-batch ``start_micro``."""
    sampler = StepSampler(
        len(dataset), args.train_batch_size, args.seed, rank, world, start_batch=start_micro
    )
    return DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate,
        **loader_kwargs(args, args.dataloader_num_workers),  # items are seeded by position: no epoch state
    )


def make_optimizer(param_groups: list[dict[str, Any]], args: argparse.Namespace) -> torch.optim.Optimizer:
    for g in param_groups:
        if not g["params"]:
            raise ValueError(f"optimizer group {g.get('name', '?')} has no trainable parameters")
    return make_adamw(  # --fused_adamw
        param_groups,
        args,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def run_stage(
    accelerator,
    args: argparse.Namespace,
    cfg: CoreConfig,
    *,
    dataset: Dataset,
    step_fn: Callable[[dict, torch.Generator], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    optimizer,
    lr_scheduler,
    params: list[torch.nn.Parameter],
    train_modules: list[torch.nn.Module],
    save_final: Callable[[], None],
    validate: Callable[[int], None] | None = None,
    start_step: int = 0,
) -> None:
    """Run a stage on the core. ``step_fn(batch, generator) -> (loss, logs)`` handles one micro-batch;
    ``start_step`` is where this stage's step count (and its data stream) begins."""
    accum = args.gradient_accumulation_steps

    def core_step(micro: list[dict], ctx: StepContext) -> dict[str, torch.Tensor]:
        totals: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            with ctx.micro_step(i):
                loss, logs = step_fn(batch, ctx.generator)
                ctx.backward(loss)
            for k, v in {**logs, "loss": loss}.items():
                totals[k] = totals.get(k, 0.0) + torch.as_tensor(v).detach().float() / len(micro)
        return totals

    def batches(start_micro: int):
        offset = start_micro - start_step * accum  # the data stream starts with this stage
        return iter(
            make_dataloader(dataset, args, accelerator.process_index, accelerator.num_processes, offset)
        )

    def on_step_end(step: int) -> None:
        if validate is not None and args.validation_prompt and step % args.validation_steps == 0:
            validate(step)

    task = Task(
        step_fn=core_step,
        batches=batches,
        optims=[Optim("lora", optimizer, lr_scheduler, params, args.max_grad_norm)],
        train_modules=train_modules,
        on_step_end=on_step_end,
        save_final=save_final,
        tracker_config=vars(args),
    )
    run_training(accelerator, cfg, task, start_step=start_step)
