"""U-REPA training samples from the pre-built caches: VAE latent + DINOv2 tokens + CLIP text embedding.

    ds = SD15AlignedDataset("data/train_200k.csv", "caches/sd15_latents_512", "caches/dinov2_vitl14_224",
                            "caches/clip_imagenet_sd15.safetensors", cfg_dropout=0.1,
                            expected={"D": 1024, "num_tokens": 256, "dtype": "float16", "encoder": "dinov2_vitl14"})
    item = ds[0]
    item["latent"]                 # [4, 64, 64] float32, already scaled by the VAE scaling_factor (U-Net input)
    item["dino_tokens"]["mid"]     # [256, 1024] stored dtype (fp16), L2-normalised; one entry per aligned layer
    item["encoder_hidden_states"]  # [77, 768] float32; the null-prompt embedding with probability cfg_dropout
    item["class_id"]               # int

Everything is checked when the dataset is built, so a mismatch fails at start-up with the file and the values,
not hours into training: the caches' metadata against ``expected`` and against each other, every CSV id present
in both caches (ids the caches recorded as unreadable images are dropped with a warning), class ids within the
embedding table; the readers check each shard's file size and a sample of records against the metadata
(datasets/lmdb_cache.py). LMDB environments are opened lazily in each DataLoader worker (read-only, no locks).

Every record read is checked: its length always, its checksum the first time the sample is read in this run
(``verify_checksums="once"``: a bitmap in shared memory, kept across DataLoader workers and epochs; hashing
every read would cost a third of the copy, see docs/urepa_preprocessing.md), or on every read (``"always"``),
or never (``"off"``). A bad record in :meth:`SD15AlignedDataset.get_batch` (the trainer's path) is skipped --
the batch is one sample smaller -- counted (``num_bad_records``, per process) and logged with its cache, shard
and key; ``on_bad_record="error"`` raises instead. Per-item access (``ds[i]``) always raises
:class:`~datasets.lmdb_cache.CorruptRecordError`: it has no sample to return.

CFG dropout and posterior sampling are deterministic functions of (seed, epoch, index): call ``set_epoch`` at
the start of each epoch (before iterating a DataLoader; workers must not be persistent across epochs for the new
epoch to reach them, or re-create the iterator) and a resumed run sees the same draws.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from datasets.lmdb_cache import LMDBCacheReader
from datasets.lmdb_cache_format import CorruptRecordError, parse_dtype
from datasets.sample_csv import read_sample_csv
from utils.cli import UserError
from utils.logging import get_logger

logger = get_logger("sd15_aligned")

EXPECTATION_KEYS = {
    "D": ("dino", "D"),
    "num_tokens": ("dino", "num_tokens"),
    "dtype": ("dino", "dtype"),
    "encoder": ("dino", "encoder"),
    "grid": ("dino", "grid"),
    "resolution": ("dino", "resolution"),
    "latent_shape": ("latent", "latent_shape"),
    "latent_dtype": ("latent", "dtype"),
    "clip_dim": ("clip", "dim"),
}
_MASK64 = (1 << 64) - 1
BAD_RECORD_POLICIES = ("skip", "error")
VERIFY_MODES = ("once", "always", "off")


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a fast, well-spread hash of a 64-bit integer."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def sample_hash(seed: int, epoch: int, index: int, stream: int) -> int:
    """A 64-bit value determined by (seed, epoch, index, stream); different streams are independent."""
    x = _mix64((seed & _MASK64) ^ 0x9E3779B97F4A7C15)
    x = _mix64(x ^ (epoch & _MASK64))
    x = _mix64(x ^ (index & _MASK64))
    return _mix64(x ^ stream)


def uniform01(seed: int, epoch: int, index: int, stream: int = 0) -> float:
    return (sample_hash(seed, epoch, index, stream) >> 11) / float(1 << 53)


def load_clip_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(embeddings [K+1, L, dim], info)`` from prepare_clip_embeddings.py's .safetensors or .pt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP embeddings file not found: {path} (make it with preprocessing/prepare_clip_embeddings.py)"
        )
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if "embeddings" not in f.keys():
                raise ValueError(f"{path}: no 'embeddings' tensor (has {list(f.keys())})")
            embeddings = f.get_tensor("embeddings")
            info = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or "embeddings" not in obj:
            raise ValueError(f"{path}: expected a dict with an 'embeddings' tensor")
        embeddings = obj["embeddings"]
        info = {k: v for k, v in obj.items() if k != "embeddings"}
    if embeddings.ndim != 3 or embeddings.shape[0] < 2:
        raise ValueError(
            f"{path}: embeddings must be [num_classes + 1, tokens, dim], got {list(embeddings.shape)}"
        )
    null_index = int(info.get("null_index", embeddings.shape[0] - 1))
    if null_index != embeddings.shape[0] - 1:
        raise ValueError(
            f"{path}: the null prompt must be the last row ({embeddings.shape[0] - 1}), metadata says {null_index}"
        )
    info["null_index"] = null_index
    return embeddings, info


class CacheValidationError(UserError, ValueError):
    """A cache does not match the CSV, the other cache or the model's expectations (found before any model is
    loaded; a user error: entry points end with the message and exit code 2)."""


class SD15AlignedDataset(Dataset):
    """See the module docstring.

    Args:
        csv_path: sample CSV (id,img_path,class_id,synset) -- the training set.
        latent_dir, dino_dir: LMDB caches from preprocessing/build_caches.py (or the two single-cache scripts).
        clip_embeddings_path: [K+1, 77, dim] text embeddings, null prompt last.
        cfg_dropout: probability of replacing the class prompt by the null prompt.
        expected: what the model needs, checked against the metadata; keys among ``D``, ``num_tokens``,
            ``dtype`` (DINO tokens), ``encoder`` (e.g. "dinov2_vitl14"), ``grid``, ``resolution`` (DINO crop),
            ``latent_shape`` ([4, 64, 64]), ``latent_dtype``, ``clip_dim``.
        layers: names of the aligned U-Net layers; each gets the same DINO target tensor.
        seed: base of the per-(epoch, index) draws.
        sample_posterior: with a moments cache (mean, std), draw ``mean + std * eps`` (else use the mean).
        drop_unreadable: drop CSV ids that a cache recorded as unreadable images (with a warning) instead of
            failing; ids missing for any other reason are always an error.
        on_bad_record: a record with a wrong length or checksum met by :meth:`get_batch`: ``"skip"`` it (counted
            in ``num_bad_records``, logged) or raise (``"error"``).
        verify_checksums: check a sample's records' checksums the first time it is read in this run
            (``"once"``), on every read (``"always"``) or never (``"off"``; lengths are always checked).
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        latent_dir: str | os.PathLike,
        dino_dir: str | os.PathLike,
        clip_embeddings_path: str | os.PathLike,
        cfg_dropout: float = 0.1,
        expected: dict[str, Any] | None = None,
        layers: Sequence[str] = ("mid",),
        seed: int = 0,
        sample_posterior: bool = True,
        drop_unreadable: bool = True,
        on_bad_record: str = "skip",
        verify_checksums: str = "once",
    ) -> None:
        if on_bad_record not in BAD_RECORD_POLICIES:
            raise ValueError(f"on_bad_record must be one of {BAD_RECORD_POLICIES}, got {on_bad_record!r}")
        if verify_checksums not in VERIFY_MODES:
            raise ValueError(f"verify_checksums must be one of {VERIFY_MODES}, got {verify_checksums!r}")
        self.on_bad_record = on_bad_record
        self.verify_checksums = verify_checksums
        self.num_bad_records = 0  # skipped in this process (each DataLoader worker counts its own)
        if not 0.0 <= cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1], got {cfg_dropout}")
        if isinstance(layers, str) or not layers:
            raise ValueError(f"layers must be a non-empty list of layer names, got {layers!r}")
        self.csv_path = Path(csv_path)
        self.cfg_dropout = float(cfg_dropout)
        self.layers = tuple(layers)
        self.seed = int(seed)
        self.epoch = 0
        self.sample_posterior = sample_posterior

        rows = read_sample_csv(self.csv_path)
        self.latents = LMDBCacheReader(latent_dir)
        self.dino = LMDBCacheReader(dino_dir)
        embeddings, self.clip_info = load_clip_embeddings(clip_embeddings_path)
        self.clip_path = Path(clip_embeddings_path)
        self._check_metadata(expected or {}, embeddings)

        ids = [r.id for r in rows]
        lat_shard = self.latents.locate(ids)
        dino_shard = self.dino.locate(ids)
        keep = np.ones(len(ids), dtype=bool)
        unreadable = {**self.latents.metadata.get("corrupt", {}), **self.dino.metadata.get("corrupt", {})}
        unreadable = unreadable if drop_unreadable else {}
        for name, reader, shard in (("latent", self.latents, lat_shard), ("DINO", self.dino, dino_shard)):
            keep &= self._check_ids(name, reader, ids, shard, unreadable)
        if not keep.all():
            logger.warning(
                "%s: dropping %d of %d ids that the caches recorded as unreadable images",
                csv_path,
                (~keep).sum(),
                len(ids),
            )
        if not keep.any():
            raise CacheValidationError(f"{csv_path}: no usable ids left after dropping unreadable images")
        rows = [r for r, k in zip(rows, keep) if k]
        # compact, fork-friendly storage: no per-row Python objects touched in the workers
        self._ids = np.array([r.id.encode() for r in rows], dtype=np.bytes_)
        self.class_ids = np.array([r.class_id for r in rows], dtype=np.int64)
        self._lat_shard = lat_shard[keep]
        self._dino_shard = dino_shard[keep]
        # samples whose records passed the checksum in this run; shared memory, so that the DataLoader workers
        # of every epoch see (and extend) the same map
        self._verified = torch.zeros(len(rows), dtype=torch.bool).share_memory_()

        num_classes = embeddings.shape[0] - 1
        bad = np.flatnonzero((self.class_ids < 0) | (self.class_ids >= num_classes))
        if len(bad):
            raise CacheValidationError(
                f"{csv_path}: {len(bad)} rows have class_id outside 0..{num_classes - 1} of {self.clip_path} "
                f"({embeddings.shape[0]} rows = {num_classes} classes + null), e.g. ids "
                f"{[self._ids[i].decode() for i in bad[:5]]} with class_id {self.class_ids[bad[:5]].tolist()}"
            )
        self.embeddings = embeddings.contiguous()
        self.null_index = num_classes
        self._has_moments = self.latents.metadata.get("content") == "mean_std"

    # ------------------------------------------------------------------------------------------ validation
    def _check_metadata(self, expected: dict[str, Any], embeddings: torch.Tensor) -> None:
        unknown = sorted(set(expected) - set(EXPECTATION_KEYS))
        if unknown:
            raise ValueError(f"unknown expectation keys {unknown}; valid: {sorted(EXPECTATION_KEYS)}")
        lat_meta, dino_meta = self.latents.metadata, self.dino.metadata
        lat_file, dino_file = self.latents.path / "metadata.json", self.dino.path / "metadata.json"
        if lat_meta.get("kind") != "vae_latent":
            raise CacheValidationError(
                f"{lat_file}: kind = {lat_meta.get('kind')!r}, expected 'vae_latent' (is this the latent cache?)"
            )
        if dino_meta.get("kind") != "dino_tokens":
            raise CacheValidationError(
                f"{dino_file}: kind = {dino_meta.get('kind')!r}, expected 'dino_tokens' (is this the DINO cache?)"
            )
        if not lat_meta.get("scaled", False):
            raise CacheValidationError(f"{lat_file}: latents are not scaled by the VAE scaling_factor")
        if not dino_meta.get("normalized", False):
            raise CacheValidationError(
                f"{dino_file}: normalized = {dino_meta.get('normalized')!r}, need L2-normalised tokens"
            )
        n, d = dino_meta["shape"]
        if n != dino_meta.get("num_tokens", n) or d != dino_meta.get("D", d):
            raise CacheValidationError(f"{dino_file}: shape {dino_meta['shape']} disagrees with num_tokens/D")
        sources = {"latent": (lat_meta, lat_file), "dino": (dino_meta, dino_file)}
        clip_meta = {"dim": int(embeddings.shape[-1])}
        for key, want in expected.items():
            which, field = EXPECTATION_KEYS[key]
            if which == "clip":
                have, where = clip_meta[field], self.clip_path
            else:
                meta, where = sources[which]
                have = meta.get(field)
            if isinstance(want, tuple):
                want = list(want)
            if key in ("dtype", "latent_dtype") and isinstance(want, torch.dtype):
                want = {
                    v: k
                    for k, v in (
                        ("float16", torch.float16),
                        ("bfloat16", torch.bfloat16),
                        ("float32", torch.float32),
                    )
                }[want]
            if have != want:
                raise CacheValidationError(
                    f"{where}: {field} = {have!r}, but the model expects {key} = {want!r}"
                )
        parse_dtype(dino_meta["dtype"])

    def _check_ids(
        self,
        name: str,
        reader: LMDBCacheReader,
        ids: list[str],
        shard: np.ndarray,
        unreadable: dict[str, str],
    ) -> np.ndarray:
        missing = np.flatnonzero(shard < 0)
        if not len(missing):
            return np.ones(len(ids), dtype=bool)
        really_missing = [ids[i] for i in missing if ids[i] not in unreadable]
        if really_missing:
            raise CacheValidationError(
                f"{len(really_missing)} of {len(ids)} ids of {self.csv_path} are missing in the {name} cache "
                f"{reader.path} ({len(reader)} records), e.g. {really_missing[:5]}; build the cache for this CSV "
                f"(or resume the interrupted build) first"
            )
        keep = np.ones(len(ids), dtype=bool)
        keep[missing] = False
        return keep

    # ------------------------------------------------------------------------------------------------ data
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _must_verify(self, indices: list[int]) -> list[bool]:
        """Whether each sample's checksums are to be checked on this read (one look-up per batch)."""
        if self.verify_checksums == "once":
            return (~self._verified[torch.tensor(indices, dtype=torch.long)]).tolist()
        return [self.verify_checksums == "always"] * len(indices)

    def __len__(self) -> int:
        return len(self._ids)

    def sample_id(self, index: int) -> str:
        return self._ids[index].decode()

    def is_dropped(self, index: int) -> bool:
        """Whether item ``index`` uses the null prompt in the current epoch."""
        return self.cfg_dropout > 0 and uniform01(self.seed, self.epoch, index, stream=1) < self.cfg_dropout

    def __getitem__(self, index: int | Sequence[int]) -> dict[str, Any]:
        if not isinstance(index, (int, np.integer)):
            return self.get_batch(index)
        index = int(index)
        if index < 0:
            index += len(self)
        sid = self._ids[index].decode()
        verify = self._must_verify([index])[0]
        latent = self.latents.get(sid, int(self._lat_shard[index]), verify).float()
        if self._has_moments:
            mean, std = latent[0], latent[1]
            if self.sample_posterior:
                gen = torch.Generator().manual_seed(sample_hash(self.seed, self.epoch, index, 2) >> 1)
                latent = mean + std * torch.randn(mean.shape, generator=gen)
            else:
                latent = mean
        tokens = self.dino.get(sid, int(self._dino_shard[index]), verify)
        self._verified[index] |= verify
        class_id = int(self.class_ids[index])
        row = self.null_index if self.is_dropped(index) else class_id
        return {
            "latent": latent,
            "dino_tokens": {name: tokens for name in self.layers},
            "encoder_hidden_states": self.embeddings[row].float(),
            "class_id": class_id,
        }

    def get_batch(self, indices: Sequence[int], compact: bool = False) -> dict[str, Any]:
        """The collated batch of ``indices``, read straight into preallocated tensors (one copy per record).

        Equal to ``default_collate([ds[i] for i in indices])`` but without per-sample tensors and the collate
        copy; :func:`make_batched_loader` uses it (through :class:`BatchedReads`).

        ``compact=True`` is the form the trainer reads: latents stay in the cache dtype (fp16: half the bytes;
        cast on the GPU) unless posterior sampling has to compute them, and instead of a [77, dim] fp32 prompt
        embedding per sample (236 KB at SD-1.5's 768, more than the latent and a third of the token record) the
        batch holds ``prompt_index``, the row of the embedding table (the null row for CFG-dropped samples),
        to look up on the device.
        """
        idx = [int(i) + (len(self) if int(i) < 0 else 0) for i in indices]
        n = len(idx)
        stored = compact and not (self._has_moments and self.sample_posterior)
        lat_shape = (n, *self.latents.shape)
        if stored and not self._has_moments:  # read straight into the batch tensor that is handed over
            lat = _batch_tensor(lat_shape, self.latents.dtype)
        else:
            lat = torch.empty(lat_shape, dtype=self.latents.dtype)
        tok = _batch_tensor((n, *self.dino.shape), self.dino.dtype)
        good = []
        for j, (i, verify) in enumerate(zip(idx, self._must_verify(idx))):
            sid = self._ids[i].decode()
            try:
                self.latents.read_into(sid, lat[j], int(self._lat_shard[i]), verify)
                self.dino.read_into(sid, tok[j], int(self._dino_shard[i]), verify)
            except CorruptRecordError as err:
                if self.on_bad_record == "error":
                    raise
                self.num_bad_records += 1
                logger.warning(
                    "skipping sample %r: %s (%d bad records skipped so far in this process)",
                    sid,
                    err,
                    self.num_bad_records,
                )
                continue
            good.append(j)
        if self.verify_checksums == "once":
            self._verified[torch.tensor([idx[j] for j in good], dtype=torch.long)] = True
        if len(good) < n:
            if not good:
                raise CorruptRecordError(
                    f"every record of a batch of {n} is corrupt (e.g. {self._ids[idx[0]].decode()!r}); check the "
                    f"caches with preprocessing/verify_cache.py {self.latents.path} (and {self.dino.path})",
                    self._ids[idx[0]].decode(),
                    self.latents.path,
                )
            idx = [idx[j] for j in good]
            n = len(idx)
            lat, tok = _select(lat, good), _select(tok, good)
        latent = lat if stored else lat.float()
        if self._has_moments:
            mean, std = latent[:, 0], latent[:, 1]
            if self.sample_posterior:
                eps = torch.stack(
                    [
                        torch.randn(
                            mean.shape[1:],
                            generator=torch.Generator().manual_seed(
                                sample_hash(self.seed, self.epoch, i, 2) >> 1
                            ),
                        )
                        for i in idx
                    ]
                )
                latent = mean + std * eps
            else:
                latent = mean
        class_ids = torch.from_numpy(self.class_ids[idx])
        rows = torch.tensor(
            [self.null_index if self.is_dropped(i) else int(c) for i, c in zip(idx, class_ids)]
        )
        if latent is lat:
            out_latent = lat
        else:
            out_latent = _batch_tensor(tuple(latent.shape), latent.dtype)
            out_latent.copy_(latent)
        batch: dict[str, Any] = {"latent": out_latent, "dino_tokens": {name: tok for name in self.layers}}
        if compact:
            batch["prompt_index"] = rows
        else:
            hidden = _batch_tensor((n, *self.embeddings.shape[1:]), torch.float32)
            hidden.copy_(self.embeddings[rows])
            batch["encoder_hidden_states"] = hidden
        batch["class_id"] = class_ids
        return batch

    @property
    def null_embedding(self) -> torch.Tensor:
        """[77, dim] float32 embedding of the empty prompt (for CFG at sampling time)."""
        return self.embeddings[self.null_index].float()

    def __repr__(self) -> str:
        return (
            f"SD15AlignedDataset({len(self)} samples from {self.csv_path}, latent {self.latents.shape}, "
            f"dino {self.dino.shape} {self.dino.metadata['encoder']}, cfg_dropout={self.cfg_dropout})"
        )


def _select(batch: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``batch[rows]`` in a tensor made like the batch's (shared memory in a worker)."""
    out = _batch_tensor((len(rows), *batch.shape[1:]), batch.dtype)
    return torch.index_select(batch, 0, torch.tensor(rows), out=out)


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor; in a DataLoader worker it is allocated in shared memory right away (as default_collate
    does), so sending the batch to the main process does not copy it once more."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(numel, device=proto.device)
    return proto.new(storage).resize_(*shape)


class BatchedReads(Dataset):
    """A view of an :class:`SD15AlignedDataset` whose ``__getitems__`` returns the whole collated batch.

    PyTorch's map-style fetcher calls ``dataset.__getitems__(indices)`` when it exists and hands the result to
    ``collate_fn``; with :func:`already_collated` as ``collate_fn`` a worker builds each batch with
    :meth:`SD15AlignedDataset.get_batch` (one copy per record). The view keeps the plain ``batch_size`` /
    ``shuffle`` DataLoader form, so accelerate's ``prepare`` (seedable sampler, sharding, ``set_epoch``,
    ``skip_first_batches``) treats it like any other loader. It is a separate object so that the dataset itself
    stays usable with the default collate.
    """

    def __init__(self, dataset: SD15AlignedDataset, compact: bool = False) -> None:
        self.dataset = dataset
        self.compact = compact

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset[index]

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        return self.dataset.get_batch(indices, compact=self.compact)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def already_collated(batch: dict[str, Any]) -> dict[str, Any]:
    """``collate_fn`` for :class:`BatchedReads`: the batch is complete when the fetcher gets it."""
    return batch


def make_batched_loader(
    dataset: SD15AlignedDataset,
    batch_size: int,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 4,
    seed: int | None = 0,
    compact: bool = False,
    **loader_kwargs: Any,
) -> DataLoader:
    """A DataLoader whose workers build whole batches with :meth:`SD15AlignedDataset.get_batch`.

    Same batches as ``DataLoader(dataset, batch_size, shuffle, drop_last=...)`` with the default collate (same
    sampler, same order for the same ``seed``), but each record is copied once (LMDB page -> batch tensor)
    instead of twice. ``seed=None`` leaves the shuffle generator unset (accelerate's seedable sampler then
    seeds it from ``data_seed``). ``compact=True``: batches in :meth:`SD15AlignedDataset.get_batch`'s compact
    form (cache-dtype latents, ``prompt_index`` instead of ``encoder_hidden_states``).
    """
    generator = torch.Generator().manual_seed(seed) if (shuffle and seed is not None) else None
    return DataLoader(
        BatchedReads(dataset, compact=compact),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        collate_fn=already_collated,
        num_workers=num_workers,
        generator=generator,
        **loader_kwargs,
    )
