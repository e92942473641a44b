"""Checkpoints of the training core: atomic, finite, pruned by one rule, and free of pickled code.

    checkpoint-<step>/
        trainer_state.json          step, skipped-step counter and the trainer's own JSON state (EMA counters...)
        optimizer*.bin, scheduler*.bin, random_states_<rank>.pkl    accelerate's files (loaded weights_only=True)
        <trainer files>             LoRA / trained weights / EMA as safetensors, written by the trainer's hooks

Nothing is registered with ``accelerator.register_for_checkpointing`` (accelerate unpickles those with
``weights_only=False``); trainer state is JSON and tensors are safetensors. ``trainer_state.json`` also
lists every other file's SHA-256; a resume verifies them first and names a damaged or missing file.
A save first checks the free space (estimated from the previous checkpoint or the trained state) and turns
an OS error into one message naming the path, removing its partial folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from utils.checkpoint import (
    atomic_save_state,
    checkpoint_step,
    list_checkpoints,
    partial_dir,
    prune_checkpoints,
    resolve_resume_path,
)
from utils.cli import UserError
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
    files: dict[str, str] = field(default_factory=dict)  # file name -> SHA-256 of the checkpoint's files

    def save(self, ckpt_dir: str | os.PathLike) -> None:
        """Write ``trainer_state.json`` with the checksums of every other file in ``ckpt_dir``."""
        ckpt_dir = Path(ckpt_dir)
        self.files = {
            p.relative_to(ckpt_dir).as_posix(): sha256_of(p)
            for p in sorted(ckpt_dir.rglob("*"))
            if p.is_file() and p.name != STATE_FILE
        }
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
            step=int(raw["step"]),
            skipped_steps=int(raw.get("skipped_steps", 0)),
            extra=raw.get("extra", {}),
            files=raw.get("files", {}),
        )


class CheckpointError(UserError):
    """A checkpoint that cannot be written (disk full, I/O error) or read back (damaged, incomplete)."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(ckpt: Path, state: TrainerState) -> None:
    """Every file listed in ``trainer_state.json`` present with its checksum; every safetensors file readable.

    Checkpoints written before checksums existed list none: their safetensors headers are still checked, so a
    truncated file is named instead of failing deep in the loader with "incomplete metadata".
    """
    for name, digest in sorted(state.files.items()):
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing (listed in {ckpt / STATE_FILE}); {_use_another(ckpt)}")
        if sha256_of(f) != digest:
            raise CheckpointError(
                f"{f} is damaged: its SHA-256 differs from the one recorded when it was saved "
                f"({ckpt / STATE_FILE}); {_use_another(ckpt)}"
            )
    from safetensors import safe_open

    for f in sorted(ckpt.rglob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as err:  # SafetensorError: incomplete metadata, header too large, ...
            raise CheckpointError(
                f"{f} is not a readable safetensors file ({str(err).splitlines()[0][:160]}); {_use_another(ckpt)}"
            ) from None


def _use_another(ckpt: Path) -> str:
    others = [p.name for p in list_checkpoints(ckpt.parent) if p != ckpt]
    hint = f" (others in {ckpt.parent}: {', '.join(others[-3:])})" if others else ""
    return f"resume from another checkpoint with --resume_from_checkpoint PATH{hint}, or start over"


def estimate_checkpoint_bytes(output_dir: Path, accelerator, params: list[torch.nn.Parameter]) -> int:
    """Bytes the next checkpoint will take: the newest complete one's size, else the trained tensors and the
    optimizer state (a lower bound for the first save; the OS error handling covers the rest)."""
    previous = list_checkpoints(output_dir)
    if previous:
        return sum(p.stat().st_size for p in previous[-1].rglob("*") if p.is_file())
    total = sum(p.numel() * p.element_size() for p in params)
    for opt in getattr(accelerator, "_optimizers", []):
        for st in getattr(opt, "state", {}).values():
            total += sum(t.numel() * t.element_size() for t in st.values() if torch.is_tensor(t))
    return total


def check_free_space(output_dir: Path, need: int, step: int) -> None:
    free = shutil.disk_usage(output_dir).free
    if free < need * 1.05 + (16 << 20):
        raise CheckpointError(
            f"not enough free disk space for checkpoint-{step} in {output_dir}: it needs about "
            f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free. Free some space (or lower "
            "--checkpoints_total_limit) and resume with --resume_from_checkpoint latest."
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
    output_dir = Path(output_dir)
    target = output_dir / f"checkpoint-{state.step}"
    if accelerator.is_main_process:
        check_free_space(output_dir, estimate_checkpoint_bytes(output_dir, accelerator, params), state.step)
    try:
        path = atomic_save_state(accelerator, target, write_extra=state.save)
    except Exception as err:
        # torch's writer reports ENOSPC as "basic_ios::clear: iostream error" / "file write failed", safetensors
        # as SafetensorError("... StorageFull ... No space left on device")
        if not isinstance(err, OSError) and not _is_write_error(err):
            raise
        shutil.rmtree(partial_dir(target), ignore_errors=True)
        free = shutil.disk_usage(output_dir).free / 2**20
        where = getattr(err, "filename", None) or partial_dir(target)
        raise CheckpointError(
            f"could not write checkpoint-{state.step} ({where}): {_reason(err)}; {free:.1f} MiB free in "
            f"{output_dir}. The partial folder was removed; the previous checkpoints are untouched."
        ) from err
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit)
        logger.info("saved %s", path)
    accelerator.wait_for_everyone()
    return path


def _is_write_error(err: Exception) -> bool:
    text = str(err).lower()
    return any(
        w in text
        for w in ("iostream", "file write failed", "no space", "storagefull", "disk quota", "quotaexceeded")
    )


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror  # "No space left on device", "Disk quota exceeded", ...
    return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''} (disk full?)"


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


def find_checkpoint(output_dir: str | os.PathLike, value: str | None) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` (``latest`` or a path) names; None for a fresh start."""
    path = resolve_resume_path(output_dir, value)
    if path is None and value:
        logger.info("no checkpoint in %s: starting fresh", output_dir)
    return path


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    """Verify ``path`` (checksums, safetensors headers, no pickled code) and load it into the prepared objects."""
    check_safe_to_load(path, accelerator.process_index)  # first: names a crafted pickle as such
    state = TrainerState.load(path)
    verify_checkpoint(path, state)
    accelerator.load_state(str(path))
    logger.info("resumed from %s at step %d", path, state.step)
    return state
