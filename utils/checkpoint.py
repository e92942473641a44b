"""Atomic writes and checkpoint discovery, shared by every trainer and cache builder.

Every file or directory the repo writes for later reuse goes through a temporary name and an
``os.replace``, so an interrupted job never leaves a half-written checkpoint that ``latest`` would pick up.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    Works for files and directories alike: whatever the caller creates at the temporary path replaces
    ``path``. On an exception the temporary path is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            raise FileNotFoundError(f"atomic_write: nothing was written to {target}")
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` as a safetensors file atomically (tensors are made contiguous, on CPU)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_write(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)
    return Path(path)


def torch_save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through a temporary file."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


_STEP_RE = re.compile(r"-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike, prefix: str = "checkpoint-") -> list[Path]:
    """Complete checkpoint dirs ``<prefix><step>`` under ``output_dir``, sorted by step."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _STEP_RE.search(p.name)
        if p.is_dir() and p.name.startswith(prefix) and m and p.name[len(prefix) :].isdigit():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step number encoded in a ``checkpoint-<step>`` directory name."""
    m = _STEP_RE.search(Path(path).name)
    if not m:
        raise ValueError(f"cannot read a step number from checkpoint name {Path(path).name!r}")
    return int(m.group(1))


def find_latest_checkpoint(output_dir: str | os.PathLike, prefix: str = "checkpoint-") -> Path | None:
    ckpts = list_checkpoints(output_dir, prefix)
    return ckpts[-1] if ckpts else None


def resolve_resume_path(
    output_dir: str | os.PathLike, value: str | None, prefix: str = "checkpoint-"
) -> Path | None:
    """Turn ``--resume_from_checkpoint`` into a directory.

    ``None``/"" -> no resume; "latest" -> newest checkpoint in ``output_dir`` (None when there is none, so a
    fresh run starts, as in the diffusers examples); anything else must be an existing directory.
    """
    if not value:
        return None
    if value == "latest":
        return find_latest_checkpoint(output_dir, prefix)
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {value!r}: no such checkpoint directory. "
            f"Existing checkpoints in {output_dir}: {[p.name for p in list_checkpoints(output_dir, prefix)]}"
        )
    return path


def prune_checkpoints(
    output_dir: str | os.PathLike, total_limit: int | None, prefix: str = "checkpoint-"
) -> None:
    """Keep at most ``total_limit`` checkpoints, the newest (None keeps all; 1 keeps one).

    The one pruning rule of every trainer: called after a checkpoint is complete, never before.
    """
    if total_limit is None:
        return
    if total_limit < 1:
        raise ValueError(f"checkpoints_total_limit must be >= 1 (or None to keep all), got {total_limit}")
    ckpts = list_checkpoints(output_dir, prefix)
    for old in ckpts[: max(0, len(ckpts) - total_limit)]:
        shutil.rmtree(old, ignore_errors=True)


def partial_dir(output_dir: str | os.PathLike) -> Path:
    """The temporary folder :func:`atomic_save_state` writes ``output_dir`` into before renaming it."""
    output_dir = Path(output_dir)
    return output_dir.with_name(f".{output_dir.name}.partial")


def atomic_save_state(
    accelerator: Any, output_dir: str | os.PathLike, write_extra: Callable[[Path], None] | None = None
) -> Path:
    """``accelerator.save_state`` into a temporary directory, renamed when complete.

    Only the main process renames; all processes write into the same temporary directory name, which
    is derived deterministically so that every rank agrees on it. ``write_extra(tmp_dir)`` (main process)
    adds files before the rename, so they appear together with the rest.
    """
    output_dir = Path(output_dir)
    tmp = partial_dir(output_dir)
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if write_extra is not None:
            write_extra(tmp)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    accelerator.wait_for_everyone()
    return output_dir
