"""The training loop both anomaly trainers share: accelerator, data order, per-step RNG, checkpoints, logging.

Reproducible resume: everything random in a step (which images, their flips, VAE posterior sample, noise,
timesteps) is drawn from generators seeded by ``(seed, micro-step, rank)``; model, optimizer and LR-scheduler
states come from ``accelerator.load_state``. A run resumed from ``checkpoint-k`` therefore repeats the
uninterrupted run's losses from step k+1 on.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datasets.mvtec import collate
from utils.checkpoint import atomic_save_state, prune_checkpoints
from utils.logging import get_logger, progress

logger = get_logger(__name__)

LOSS_LOG_NAME = "losses.jsonl"


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class StepSampler(Sampler):
    """Endless ``(index, aug_seed)`` stream: epoch ``e`` is a permutation seeded by ``(seed, e)``.

    Rank ``r`` of ``world`` takes every ``world``-th batch; ``start_batch`` skips this rank's first batches
    (for resume), so the stream never depends on how many steps ran in this process.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start_batch: int = 0
    ):
        if n < 1:
            raise ValueError("StepSampler: empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.start_batch = rank, world, start_batch
        self._perm_epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng(derive_seed(self.seed, 17, epoch)).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> Iterator[tuple[int, int]]:
        b = self.start_batch
        while True:
            global_batch = b * self.world + self.rank
            for j in range(self.batch_size):
                pos = global_batch * self.batch_size + j
                epoch, k = divmod(pos, self.n)
                yield int(self._perm_for(epoch)[k]), derive_seed(self.seed, 29, pos)
            b += 1

    def __len__(self) -> int:  # DataLoader only needs it for len(); the stream is endless
        return 2**62


def step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """CPU generator for one micro-step's noise / timesteps / posterior sample."""
    return torch.Generator().manual_seed(derive_seed(seed, 41, micro_step, rank))


def make_dataloader(
    dataset: Dataset, args: argparse.Namespace, rank: int, world: int, start_micro: int
) -> DataLoader:
    sampler = StepSampler(
        len(dataset), args.train_batch_size, args.seed, rank, world, start_batch=start_micro
    )
    return DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        persistent_workers=args.dataloader_num_workers > 0,
    )


def make_accelerator(args: argparse.Namespace, project_name: str):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    output_dir = Path(args.output_dir)
    project_config = ProjectConfiguration(
        project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
    )
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=project_config,
    )
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return accelerator


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def init_trackers(accelerator, args: argparse.Namespace, project_name: str) -> None:
    if not args.report_to:
        return
    config = {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in vars(args).items()}
    accelerator.init_trackers(project_name, config=config)


def make_optimizer(param_groups: list[dict[str, Any]], args: argparse.Namespace) -> torch.optim.Optimizer:
    for g in param_groups:
        if not g["params"]:
            raise ValueError(f"optimizer group {g.get('name', '?')} has no trainable parameters")
    return torch.optim.AdamW(
        param_groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def make_lr_scheduler(optimizer, args: argparse.Namespace, num_steps: int, num_processes: int):
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step (diffusers convention).
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max(1, num_steps) * num_processes,
    )


@dataclass
class LoopSpec:
    """What a stage plugs into :func:`run_loop`."""

    step_fn: Callable[[dict, torch.Generator], tuple[torch.Tensor, dict[str, float]]]
    train_modules: list[torch.nn.Module]
    params: list[torch.nn.Parameter]
    save_final: Callable[[], None]
    validate: Callable[[int], None] | None = None
    extra_logs: dict[str, float] = field(default_factory=dict)


def save_checkpoint(accelerator, args: argparse.Namespace, step: int) -> Path:
    out = Path(args.output_dir)
    if accelerator.is_main_process and args.checkpoints_total_limit:
        # make room first so that the limit holds after this save (diffusers convention)
        prune_checkpoints(out, args.checkpoints_total_limit - 1)
    accelerator.wait_for_everyone()
    path = atomic_save_state(accelerator, out / f"checkpoint-{step}")
    logger.info("saved %s", path)
    return path


def run_loop(
    accelerator,
    args: argparse.Namespace,
    spec: LoopSpec,
    optimizer,
    lr_scheduler,
    dataloader,
    start_step: int,
) -> int:
    """Optimise until ``args.max_train_steps``; returns the final global step."""
    global_step = start_step
    micro = start_step * args.gradient_accumulation_steps
    rank = accelerator.process_index
    loss_log = Path(args.output_dir) / LOSS_LOG_NAME
    data = iter(dataloader)
    bar = progress(
        total=args.max_train_steps,
        desc="steps",
        disable=not accelerator.is_local_main_process,
        initial=global_step,
    )
    acc_logs: dict[str, float] = {}
    n_acc = 0
    last_saved = None
    for m in spec.train_modules:
        m.train()
    while global_step < args.max_train_steps:
        batch = next(data)
        gen = step_generator(args.seed, micro, rank)
        with accelerator.accumulate(*spec.train_modules):
            loss, logs = spec.step_fn(batch, gen)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {global_step + 1}: {logs}")
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(spec.params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        micro += 1
        for k, v in logs.items():
            acc_logs[k] = acc_logs.get(k, 0.0) + float(v)
        n_acc += 1
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        step_logs = {k: v / n_acc for k, v in acc_logs.items()}
        step_logs["lr"] = lr_scheduler.get_last_lr()[0]
        acc_logs, n_acc = {}, 0
        bar.update(1)
        bar.set_postfix(loss=f"{step_logs['loss']:.4f}")
        accelerator.log(step_logs, step=global_step)
        if accelerator.is_main_process:
            with open(loss_log, "a") as f:
                f.write(json.dumps({"step": global_step, **step_logs}) + "\n")
        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(accelerator, args, global_step)
            last_saved = global_step
        if spec.validate is not None and args.validation_prompt and global_step % args.validation_steps == 0:
            spec.validate(global_step)
    bar.close()
    accelerator.wait_for_everyone()
    if last_saved is None and global_step == start_step:
        logger.info("nothing to do: already at step %d >= --max_train_steps", global_step)
    if accelerator.is_main_process:
        spec.save_final()
    accelerator.end_training()
    return global_step


def micro_steps_per_epoch(n_items: int, args: argparse.Namespace, world: int) -> int:
    return math.ceil(n_items / (args.train_batch_size * world))
