"""DinoVQ code caches (written by preprocessing/extract_dinovq_codes.py): per image, the tokenizer's code grid.

A record is ``[V, H', W']`` (``int16`` for codebooks of <= 32768 codes, else ``int32``) in the repo's LMDB
cache format (datasets/lmdb_cache.py: sharded, checksummed, keyed by sample id). View 0 is the image, view 1
(``--flip``) its horizontal flip, as LlamaGen's ``extract_codes_c2i.py`` stores them.

    codes = DinoVQCodes("caches/dinovq_codes")
    grid = codes.get("n01440764_10026")            # LongTensor [H', W']
    image = tokenizer.decode_code(grid[None])       # [1, 3, H, W]
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from datasets.lmdb_cache import LMDBCacheReader

KIND = "dinovq_codes"
VIEWS = ("original", "hflip")


class DinoVQCodes:
    """Read-only access to a DinoVQ code cache; ``get(id, view)`` -> ``[H', W']`` int64 codes."""

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        self.cache = LMDBCacheReader(path, verify=verify)
        meta = self.cache.metadata
        if meta.get("kind") != KIND:
            raise ValueError(
                f"{path} is not a DinoVQ code cache (metadata kind {meta.get('kind')!r}, expected {KIND!r}); "
                "build one with preprocessing/extract_dinovq_codes.py"
            )
        self.metadata: dict[str, Any] = meta
        self.views: list[str] = list(meta["views"])
        self.grid: tuple[int, int] = tuple(int(s) for s in meta["grid"])
        self.codebook_size = int(meta["codebook_size"])

    def get(self, key: str, view: int = 0) -> torch.Tensor:
        """Codes ``[H', W']`` (int64) of view ``view`` (0: the image, 1: its flip when the cache has it)."""
        if not 0 <= view < len(self.views):
            raise IndexError(f"{self.cache.path} stores views {self.views}; view {view} does not exist")
        return self.cache.get(key)[view].long()

    def get_views(self, key: str) -> torch.Tensor:
        """All views ``[V, H', W']`` (int64)."""
        return self.cache.get(key).long()

    def keys(self) -> list[str]:
        return self.cache.keys()

    def __contains__(self, key: object) -> bool:
        return key in self.cache

    def __len__(self) -> int:
        return len(self.cache)


class DinoVQCodeDataset(Dataset):
    """``{"codes": [H', W'] int64, "label": int, "id": str}`` for a second-stage model (class-conditional).

    ``items``: (id, class id) pairs, e.g. from the sample CSV the cache was built from. ``random_view``: each
    epoch draws one of the stored views per sample, seeded by (seed, epoch, index) as the trainers' crops are
    (LlamaGen's dataset picks a random stored augmentation); otherwise view 0.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        items: Sequence[tuple[str, int]],
        random_view: bool = False,
        seed: int = 0,
    ) -> None:
        self.codes = DinoVQCodes(path)
        missing = [k for k, _ in items if k not in self.codes]
        if missing:
            raise KeyError(
                f"{path} has no codes for {len(missing)} of {len(items)} ids, e.g. {missing[:5]}: run "
                "preprocessing/extract_dinovq_codes.py on the same CSV (it resumes)"
            )
        self.items = list(items)
        self.random_view = random_view
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key, label = self.items[index]
        view = 0
        if self.random_view and len(self.codes.views) > 1:
            view = random.Random(hash((self.seed, self.epoch, index))).randrange(len(self.codes.views))
        return {"codes": self.codes.get(key, view), "label": int(label), "id": key}
