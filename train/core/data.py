"""Batch streams that can start at any micro-step, and the per-step random generator.

Resume is exact because nothing random in a step depends on how many steps ran in this process: the data
order is a function of (seed, position) and every step's draws come from :func:`step_generator`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers, well mixed (``SeedSequence``), stable across platforms."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def step_generator(seed: int, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one optimizer step on one rank (noise, timesteps, dropout masks, ...)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, 41, step, rank))
    return g


class StepSampler(Sampler):
    """Endless ``(index, item_seed)`` stream: epoch ``e`` is a permutation seeded by ``(seed, e)``.

    Rank ``r`` of ``world`` takes every ``world``-th batch; ``start_batch`` skips this rank's first batches
    (for resume). ``item_seed`` seeds per-item augmentation (flips), so it too depends only on the position.
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


def epoch_stream(
    accelerator, loader, start_micro: int, on_epoch: Callable[[int], None] | None = None
) -> Iterator[Any]:
    """Endless batches of an accelerate-prepared loader, starting at micro-batch ``start_micro``.

    Epoch ``e`` covers micro-batches ``e*len(loader) ... (e+1)*len(loader)-1``; the loader's seedable sampler
    is re-seeded per epoch (``set_epoch``) and the first batches of the resumed epoch are skipped with
    ``accelerator.skip_first_batches``, so a resumed run sees the uninterrupted run's batches.
    """
    n = len(loader)
    if n < 1:
        raise ValueError("the training loader yields no batch (fewer samples than one global batch?)")
    epoch, skip = divmod(start_micro, n)
    while True:
        loader.set_epoch(epoch)
        if on_epoch is not None:
            on_epoch(epoch)
        part = accelerator.skip_first_batches(loader, skip) if skip else loader
        if skip and hasattr(part, "set_epoch"):
            part.set_epoch(epoch)
        yield from part
        epoch, skip = epoch + 1, 0
