"""The one training core every trainer runs on (stage 1, stage 2, DinoVQ, latent DINO head, train_sd15.py).

A trainer builds its models, data and optimizers, then hands the core three things: a step function
(forward + ``ctx.backward`` over the micro-batches of one optimizer step), a batch stream that can start at
any micro-step, and its optimizers (:class:`Optim`). The core owns everything else: accelerator set-up and
seeding, LR schedules, accumulation, the non-finite guard, logging, checkpoints and resume.
See ``docs/training_core.md``.
"""

from train.core.checkpoint import TrainerState
from train.core.config import CoreConfig, add_core_args, core_config_from_args
from train.core.data import StepSampler, derive_seed, epoch_stream, step_generator
from train.core.loop import NonFiniteLossError, Optim, StepContext, Task, run_training
from train.core.perf import compile_module, loader_kwargs, make_adamw, prepare_model, to_channels_last
from train.core.setup import make_accelerator, make_lr_scheduler, weight_dtype_of

__all__ = [
    "CoreConfig",
    "NonFiniteLossError",
    "Optim",
    "StepContext",
    "StepSampler",
    "Task",
    "TrainerState",
    "add_core_args",
    "compile_module",
    "core_config_from_args",
    "derive_seed",
    "epoch_stream",
    "loader_kwargs",
    "make_adamw",
    "make_accelerator",
    "make_lr_scheduler",
    "prepare_model",
    "run_training",
    "step_generator",
    "to_channels_last",
    "weight_dtype_of",
]
