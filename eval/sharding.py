"""Sharded, resumable sampling: the same files from 1 process or N processes / nodes, and after any kill.

Used by ``eval/generate.py`` (stage 1 images, stage 2 triplets) and ``eval/evaluate_sd15.py`` (FID samples),
started plainly (one process) or with ``accelerate launch`` (one process per GPU, several nodes: docs/scaling.md):

- **Fixed batches.** Sample ``i`` belongs to batch ``i // batch_size`` whatever the number of processes, and its
  noise is seeded by its global index ``i``. Batched kernels can round differently for different batch sizes,
  so fixing the batches (not only the seeds) is what makes 1 and N processes write byte-identical files.
- **Round-robin batches.** The batches still to make are dealt out ``rank, rank + N, ...``; every process lists
  them before any process writes (a barrier), so all agree on the list.
- **Written as made, with its index.** Each sample file is written atomically as soon as its batch is decoded
  (``NNNN.png``); a killed job leaves complete files only.
- **Resume.** A batch with any sample missing is made again whole (same composition, same bytes) and only its
  missing files are written, so a resumed job ends with the set an uninterrupted one writes: no index twice,
  none missing. Outputs depend on (seed, index, batch size): keep ``--batch_size`` when resuming. On a CPU they
  also depend on torch's intra-op thread count (PyTorch picks CPU kernels by it, e.g. oneDNN or its native
  kernel for a 1x1 convolution), so 1 and N processes match when every process has the same count
  (``accelerate launch --multi_gpu`` sets each worker's ``OMP_NUM_THREADS``: the caller's, else 1); on a GPU
  it does not enter.

The files live on storage every process sees; metrics are then computed once, from the union, by the main
process (after a barrier), from per-batch feature files where extracting features is the cost.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch


def process_state():
    """accelerate's ``PartialState``: rank, world size and device of this process (one process when not launched).

    ``cpu=True`` without a GPU, as the training core: ``accelerate launch --multi_gpu`` then forms one gloo group
    on a CPU machine instead of N independent "main" processes.
    """
    from datetime import timedelta

    from accelerate import PartialState

    # the other processes wait at a barrier while the main one computes metrics (reference statistics of
    # 50k images, IC-LPIPS): longer than torch's default 10-30 min collective timeout
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=4))


def sample_device(device: str | None, state) -> torch.device:
    """``--device`` if given on one process; otherwise (and always on several processes) the process's own."""
    if device is None or state.num_processes > 1:
        return state.device
    return torch.device(device)


def fixed_batches(num: int, batch_size: int) -> list[list[int]]:
    """``[[0..B-1], [B..2B-1], ...]`` over ``num`` samples: the batch of a sample never depends on the job."""
    return [list(range(s, min(s + batch_size, num))) for s in range(0, num, batch_size)]


def remove_partial_files(folders: list[Path]) -> int:
    """Delete what a killed job left of ``utils.checkpoint.atomic_write`` (hidden ``.<name>.*.tmp`` folders)."""
    stale = [d for f in folders if f.is_dir() for d in f.glob(".*.tmp") if d.is_dir()]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return len(stale)


def batches_for_this_process(
    num: int, batch_size: int, done: Callable[[int], bool], state, folders: list[Path] = ()
) -> tuple[list[list[int]], int]:
    """(this process's batches with at least one sample not ``done``, how many samples exist already).

    The main process first removes partial files a killed job left in ``folders``; every process lists the
    files, then waits for the others, so no process sees another's new files.
    """
    if state.is_main_process:
        remove_partial_files(list(folders))
    state.wait_for_everyone()
    exists = [done(i) for i in range(num)]
    todo = [b for b in fixed_batches(num, batch_size) if not all(exists[i] for i in b)]
    state.wait_for_everyone()
    return todo[state.process_index :: state.num_processes], sum(exists)
