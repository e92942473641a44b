"""Checkpoints of the training core: atomic, finite, pruned by one rule, and free of pickled code.

    checkpoint-<step>/
        trainer_state.json          step, skipped-step counter and the trainer's own JSON state (EMA counters...)
        optimizer*.bin, scheduler*.bin, random_states_<rank>.pkl    accelerate's files (loaded weights_only=True)
        <trainer files>             LoRA / trained weights / EMA as safetensors, written by the trainer's hooks

Nothing is registered with ``accelerator.register_for_checkpointing`` (accelerate unpickles those with
``weights_only=False``); trainer state is JSON and tensors are safetensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from utils.checkpoint import atomic_save_state, checkpoint_step, prune_checkpoints, resolve_resume_path
from utils.logging import get_logger

logger = get_logger(__name__)

STATE_FILE = "trainer_state.json"
LOSS_LOG_NAME = "losses.jsonl"


@dataclass
class TrainerState:
    """What a resumed run must know besides the weights and the optimizer: JSON, never a pickle."""

    step: int = 0
    skipped_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, ckpt_dir: str | os.PathLike) -> None:
        Path(ckpt_dir, STATE_FILE).write_text(json.dumps(asdict(self), indent=1, sort_keys=True))

    @classmethod
    def load(cls, ckpt_dir: str | os.PathLike) -> TrainerState:
        path = Path(ckpt_dir, STATE_FILE)
        if not path.is_file():
            # checkpoints written before the core existed: the step is in the folder name
            step = checkpoint_step(ckpt_dir)
            logger.warning(
                "%s has no %s: resuming at step %d from the folder name", ckpt_dir, STATE_FILE, step
            )
            return cls(step=step)
        raw = json.loads(path.read_text())
        return cls(
            step=int(raw["step"]), skipped_steps=int(raw.get("skipped_steps", 0)), extra=raw.get("extra", {})
        )


class NonFiniteWeightsError(RuntimeError):
    """A trained parameter is NaN/Inf: such weights are never written as a checkpoint."""


def nonfinite_parameters(params: list[torch.nn.Parameter], names: dict[int, str] | None = None) -> list[str]:
    bad = [p for p in params if not torch.isfinite(p.detach()).all()]
    return [(names or {}).get(id(p), f"tensor{tuple(p.shape)}") for p in bad]


def save_checkpoint(
    accelerator, output_dir: str | os.PathLike, state: TrainerState, params, total_limit
) -> Path:
    """``checkpoint-<step>`` written atomically, then the oldest pruned so that at most ``total_limit`` remain.

    Pruning happens after the new checkpoint is complete, so an interrupted save never costs the last good
    one. The weights are checked first: the guard skips non-finite updates, but a checkpoint must never hold
    NaN/Inf whatever the cause.
    """
    bad = nonfinite_parameters(params)
    if bad:
        raise NonFiniteWeightsError(
            f"step {state.step}: {len(bad)} trained tensors are non-finite ({bad[:3]}); checkpoint not written"
        )
    path = atomic_save_state(
        accelerator,
        Path(output_dir) / f"checkpoint-{state.step}",
        write_extra=state.save,
    )
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit)
        logger.info("saved %s", path)
    accelerator.wait_for_everyone()
    return path


def check_safe_to_load(ckpt: Path, process_index: int) -> None:
    """Refuse a checkpoint whose accelerate pickles hold more than tensors and arrays (a crafted file).

    accelerate itself reads these with ``weights_only=True`` but swallows a failure on the RNG file
    ("Could not load random states"); a resumed run would then silently differ. Fail instead, naming the file.
    """
    from accelerate.utils import load

    custom = sorted(ckpt.glob("custom_checkpoint_*.pkl"))
    if custom:  # accelerate would unpickle these with weights_only=False
        raise RuntimeError(
            f"{custom[0]} is a pickled custom state, which this repo never writes (trainer state is JSON); it "
            "was not loaded. Delete it if the checkpoint is yours, otherwise do not use this checkpoint."
        )
    for name in (f"random_states_{process_index}.pkl",):
        f = ckpt / name
        if f.is_file():
            try:
                load(f, map_location="cpu")
            except Exception as err:  # UnpicklingError for anything but plain data
                raise RuntimeError(
                    f"{f} is not a plain-data accelerate file and was not loaded ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:200]}). Was the checkpoint written by this repo?"
                ) from None


def resume(accelerator, output_dir: str | os.PathLike, value: str | None) -> tuple[TrainerState, Path | None]:
    """Load ``--resume_from_checkpoint`` (``latest`` or a path) into the prepared objects; fresh state if none."""
    path = resolve_resume_path(output_dir, value)
    if path is None:
        if value:
            logger.info("no checkpoint in %s: starting fresh", output_dir)
        return TrainerState(), None
    check_safe_to_load(path, accelerator.process_index)
    accelerator.load_state(str(path))
    state = TrainerState.load(path)
    logger.info("resumed from %s at step %d", path, state.step)
    return state, path
