"""Sharded LMDB tensor cache: one fixed-shape, fixed-dtype tensor per sample id; this file holds the reader.

Shared by the VAE-latent and DINO-token caches (and anything else that caches one tensor per image).

Layout of a cache directory::

    <cache>/
      metadata.json               global metadata (identity fields + count, corrupt ids, shards); JSON, atomic
      shards/<writer>-<seq>/      LMDB environments (data.mdb, lock.mdb), each holding <= shard_size records
      writers/<writer>.json       per-writer progress: its shards, committed count, corrupt ids, finished flag
      .lock                       flock() target that serialises metadata merges between processes

* Key = the sample id (UTF-8), value = the tensor's raw bytes (C order, little endian) followed by a checksum
  (``metadata["checksum"]``: 8 bytes of xxh3-64, or 4 of crc32 where xxhash is not installed) of the key, the
  dtype, the shape and those bytes. Shape and dtype are cache-wide and live in ``metadata.json`` (``shape``,
  ``dtype``; each writer also notes them in its ``writers/*.json``), so reading a record is one ``memcpy`` plus
  the checksum (see docs/urepa_preprocessing.md for what verifying costs).
* Caches written before checksums (``format_version`` 1, no ``checksum`` field) are read without verification,
  with a warning; a resumed build keeps writing them in their own format, never a mix.
* Shards fill in write order. Each writer process (``writer_id``, e.g. ``part002-of-008`` for the third of
  eight parallel jobs) owns its shard files, so parallel jobs never share an LMDB environment and never need
  a cross-process write lock; "merging" is nothing more than the reader opening every ``shards/*`` env.
* Writes are committed in transactions (one per :meth:`LMDBCacheWriter.commit`, i.e. per batch), so an
  interrupted run loses at most the uncommitted batch. On restart every existing shard is scanned and
  :meth:`LMDBCacheWriter.has` skips finished keys; the writer appends to its own last non-full shard.
* Unreadable inputs are recorded with :meth:`LMDBCacheWriter.mark_corrupt` and reported in the metadata
  (``num_corrupt``, ``corrupt``); they are retried on the next run (decoding a bad file fails fast), and an id
  that later succeeds is no longer reported.
* Bad data is found, never served: every shard's ``data.mdb`` is checked against the size its newest meta page
  needs before it is mapped (a truncated file would otherwise kill the process with SIGBUS); on open the
  metadata's shape/dtype is checked against the writers' notes and against a sample of records (length and
  checksum); on every read the record's length and checksum are checked (:class:`CorruptRecordError`). Whole
  caches: ``python preprocessing/verify_cache.py CACHE``.
* The reader opens its environments lazily and again in each process (after a DataLoader fork or spawn),
  read-only, ``lock=False``, ``readahead=False``, through a per-process registry (py-lmdb forbids opening
  one environment twice in a process). Its key index is a sorted NumPy byte-string array (no
  per-key Python objects, so forked workers do not copy it page by page through refcount writes).
* Code: the record format, integrity checks and read-only shard handles in datasets/lmdb_cache_format.py, the
  writer in datasets/lmdb_cache_writer.py, the reader here; every public name of the three imports from here.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

from datasets.lmdb_cache_format import (
    CHECKSUM_BYTES,
    DEFAULT_CHECKSUM,
    DTYPES,
    FORMAT_VERSION,
    METADATA_FILE,
    SHARDS_DIR,
    VOLATILE_FIELDS,
    WRITERS_DIR,
    CacheCorruptError,
    CorruptRecordError,
    MetadataMismatchError,
    RecordFormat,
    TruncatedShardError,
    check_shard_size,
    dtype_name,
    estimate_cache_bytes,
    format_bytes,
    list_shards,
    open_shard_readonly,
    parse_dtype,
    read_metadata,
    rebuild_hint,
    record_nbytes,
    release_env,
    scan_keys,
    shared_readonly_env,
    tensor_to_bytes,
    unopenable_error,
)
from datasets.lmdb_cache_writer import LMDBCacheWriter
from utils.logging import get_logger

logger = get_logger("lmdb_cache")

__all__ = [
    "CHECKSUM_BYTES",
    "CacheCorruptError",
    "CorruptRecordError",
    "DEFAULT_CHECKSUM",
    "DTYPES",
    "FORMAT_VERSION",
    "LMDBCacheReader",
    "LMDBCacheWriter",
    "METADATA_FILE",
    "MetadataMismatchError",
    "RecordFormat",
    "SHARDS_DIR",
    "TruncatedShardError",
    "VOLATILE_FIELDS",
    "WRITERS_DIR",
    "check_shard_size",
    "dtype_name",
    "estimate_cache_bytes",
    "format_bytes",
    "list_shards",
    "open_shard_readonly",
    "parse_dtype",
    "read_metadata",
    "rebuild_hint",
    "record_nbytes",
    "release_env",
    "shared_readonly_env",
    "tensor_to_bytes",
]


class LMDBCacheReader:
    """Read-only access to a cache built by :class:`LMDBCacheWriter`.

    ``reader.get(id)`` returns a fresh tensor with the stored dtype (fp16/bf16 are preserved) and shape.
    Environments are opened on first use in each process, so the reader can be created in the main process
    and used in DataLoader workers.

    Checks (see the module docstring): each shard's file size when it is opened; on construction, metadata.json's
    ``shape``/``dtype`` against the writers' notes and ``sample_records`` records (length and checksum), errors
    naming the cache and the field; on every read, the record's length and (``verify``) checksum, a
    :class:`CorruptRecordError` naming the cache, the shard and the key. ``verify=False`` skips the checksums only.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True, sample_records: int = 16) -> None:
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        meta_file = self.path / METADATA_FILE
        for name in ("shape", "dtype"):
            if name not in self.metadata:
                raise CacheCorruptError(f"{meta_file}: field {name!r} is missing (rebuild the cache)")
        try:
            self.dtype = parse_dtype(self.metadata["dtype"])
            self.shape = tuple(int(s) for s in self.metadata["shape"])
        except (TypeError, ValueError) as err:
            raise MetadataMismatchError(f"{meta_file}: field 'shape' or 'dtype' is malformed: {err}") from err
        self.checksum = self.metadata.get("checksum")
        self.format = RecordFormat(self.shape, self.metadata["dtype"], self.checksum)
        self.verify = bool(verify) and self.checksum is not None
        if self.checksum is None:
            logger.warning(
                "%s has no per-record checksums (built before format 2): records are read without "
                "verification (lengths are still checked); rebuild it into a new directory to get them",
                self.path,
            )
        self._check_writer_notes()
        self.shard_paths = list_shards(self.path)
        keys: list[bytes] = []
        owners: list[np.ndarray] = []
        samples: list[tuple[int, bytes]] = []
        for i, shard in enumerate(self.shard_paths):
            try:
                shard_keys = scan_keys(shard)
            except lmdb.Error as err:
                raise unopenable_error(shard, err) from err
            keys.extend(shard_keys)
            owners.append(np.full(len(shard_keys), i, dtype=np.int32))
            samples += [(i, shard_keys[0])] if shard_keys else []  # every shard, plus random ones below
        key_array = np.array(keys, dtype=np.bytes_) if keys else np.array([], dtype="S1")
        order = np.argsort(key_array, kind="stable")
        self._sorted_keys = key_array[order]
        self._owners = (np.concatenate(owners) if owners else np.zeros(0, np.int32))[order]
        if len(self._sorted_keys) > 1 and (self._sorted_keys[1:] == self._sorted_keys[:-1]).any():
            dup = self._sorted_keys[1:][self._sorted_keys[1:] == self._sorted_keys[:-1]][0].decode()
            raise ValueError(f"{self.path}: key {dup!r} is stored in more than one shard (corrupt cache)")
        if sample_records > 0:
            picks = random.Random(0).sample(range(len(keys)), min(len(keys), sample_records))
            self._check_sample(samples + [(int(self._owners[j]), self._sorted_keys[j]) for j in picks])

    # ------------------------------------------------------------------------------------------ validation
    def _check_writer_notes(self) -> None:
        """metadata.json's shape/dtype against what each writer noted it wrote (writers/*.json)."""
        for state_path in sorted((self.path / WRITERS_DIR).glob("*.json")):
            try:
                state = json.loads(state_path.read_text())
            except (OSError, ValueError):
                continue  # progress notes only; the record checks below still apply
            for name, have in (("shape", list(self.shape)), ("dtype", self.metadata["dtype"])):
                wrote = state.get(name)
                if wrote is not None and wrote != have:
                    raise MetadataMismatchError(
                        f"{self.path / METADATA_FILE}: field {name!r} is {have!r}, but writer {state_path.stem} "
                        f"wrote its records as {wrote!r} ({state_path}); metadata.json was edited or belongs "
                        f"to another cache: restore {name} = {wrote!r}, or rebuild the cache"
                    )

    def _check_sample(self, samples: list[tuple[int, bytes]]) -> None:
        """Length and checksum of a few records: when all of them fail, metadata.json does not describe the
        records (an error naming the field); when only some do, those records are corrupt (a warning)."""
        bad: list[tuple[str, str, Any]] = []
        for shard, key in samples:
            value = self.get_value(key.decode(), shard, check=False)
            problem = self.format.problem(key, value, verify=self.verify)
            if problem:
                bad.append((key.decode(), problem, value))
        if not bad:
            return
        if len(bad) < len(samples):
            for key, problem, _ in bad:
                logger.warning(
                    "%s: record %r is corrupt (%s); run preprocessing/verify_cache.py %s",
                    self.path,
                    key,
                    problem,
                    self.path,
                )
            return
        key, problem, value = bad[0]
        raise MetadataMismatchError(
            f"{self.path / METADATA_FILE}: {self._which_field(key.encode(), value)}; all {len(samples)} sampled "
            f"records disagree with it (e.g. {key!r}: {problem}). Restore metadata.json, or rebuild the cache "
            "(if metadata.json is right, the records are corrupt: preprocessing/verify_cache.py lists them)"
        )

    def _which_field(self, key: bytes, value: Any) -> str:
        """Which metadata field the records contradict (they all fail: the metadata is what is wrong)."""
        payload = len(value) - (self.format.value_nbytes - self.format.nbytes)
        numel = int(np.prod(self.shape))
        for name in DTYPES:
            other = RecordFormat(self.shape, name, self.checksum)
            if name != self.metadata["dtype"] and other.length_problem(value) is None:
                if self.checksum is None or other.checksum_ok(key, value):
                    return f"field 'dtype' is {self.metadata['dtype']!r}, but the records were written as {name!r}"
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        if payload % itemsize == 0 and payload // itemsize != numel:
            return (
                f"field 'shape' {list(self.shape)} has {numel} elements, but the records hold "
                f"{payload // itemsize} {self.metadata['dtype']} values"
            )
        return (
            f"field 'shape' {list(self.shape)} or 'dtype' {self.metadata['dtype']!r} is not what the records were "
            "written with"
        )

    def _bad_record(self, key: str, shard: int, problem: str) -> CorruptRecordError:
        path = self.shard_paths[shard]
        return CorruptRecordError(
            f"{self.path}: record {key!r} in shard {path.name} is corrupt: {problem}. "
            f"Find all bad records with `python preprocessing/verify_cache.py {self.path}` (--delete_bad, then "
            "rerun the cache-building command to recompute them)",
            key,
            path,
        )

    @property
    def corrupt_ids(self) -> dict[str, str]:
        """Ids recorded as unreadable inputs (not stored)."""
        return {k: v for k, v in self.metadata.get("corrupt", {}).items() if k not in self}

    def _env(self, shard: int) -> lmdb.Environment:
        return shared_readonly_env(self.shard_paths[shard])

    def locate(self, keys: Iterable[str]) -> np.ndarray:
        """Shard index of each key (-1 when absent), vectorised: used to validate a whole CSV at once."""
        query = np.array([k.encode() for k in keys], dtype=np.bytes_)
        if len(query) == 0 or len(self._sorted_keys) == 0:
            return np.full(len(query), -1, dtype=np.int32)
        pos = np.searchsorted(self._sorted_keys, query)
        pos_clipped = np.minimum(pos, len(self._sorted_keys) - 1)
        found = self._sorted_keys[pos_clipped] == query
        return np.where(found, self._owners[pos_clipped], -1).astype(np.int32)

    def _shard_of(self, key: str) -> int:
        shard = int(self.locate([key])[0])
        if shard < 0:
            raise KeyError(f"{self.path}: no record for id {key!r}")
        return shard

    def get_value(self, key: str, shard: int | None = None, check: bool = True) -> bytes:
        """The stored value (tensor bytes + checksum), checked unless ``check=False`` (for tools)."""
        shard = self._shard_of(key) if shard is None else shard
        with self._env(shard).begin(buffers=False) as txn:
            value = txn.get(key.encode())
        if value is None:
            raise KeyError(f"{self.path}: no record for id {key!r} in shard {self.shard_paths[shard].name}")
        if check:
            problem = self.format.problem(key.encode(), value, verify=self.verify)
            if problem:
                raise self._bad_record(key, shard, problem)
        return value

    def get_bytes(self, key: str, shard: int | None = None) -> bytes:
        """The tensor's raw bytes, checked (for benchmarks and tools)."""
        return self.get_value(key, shard)[: self.format.nbytes]

    def get(self, key: str, shard: int | None = None, verify: bool | None = None) -> torch.Tensor:
        """The tensor stored under ``key`` (``shard`` from :meth:`locate` skips the index lookup); raises
        :class:`CorruptRecordError` on a wrong length or checksum (``verify``: as in :meth:`read_into`)."""
        with self._payload(key, shard, verify) as payload:
            arr = np.frombuffer(payload, dtype=np.uint8).copy()
        return torch.from_numpy(arr).view(self.dtype).view(self.shape)

    def read_into(
        self, key: str, out: torch.Tensor, shard: int | None = None, verify: bool | None = None
    ) -> torch.Tensor:
        """Copy the record straight into ``out`` (contiguous, the cache's shape and dtype): one copy, used to
        fill a preallocated batch without a per-sample tensor. Raises :class:`CorruptRecordError` (``out`` then
        holds garbage) on a wrong length, or on a wrong checksum when ``verify`` (default: the reader's
        ``verify``; never for caches without checksums)."""
        dst = out.view(-1).view(torch.uint8).numpy()
        if dst.nbytes != self.format.nbytes:
            raise ValueError(f"{self.path}: records have {self.format.nbytes} bytes, the output {dst.nbytes}")
        with self._payload(key, shard, verify) as payload:
            dst[:] = np.frombuffer(payload, dtype=np.uint8)
        return out

    @contextmanager
    def _payload(self, key: str, shard: int | None, verify: bool | None) -> Iterator[memoryview]:
        """The record's tensor bytes (length checked) while the read transaction is open; after the caller's
        copy, the checksum of the source, whose cache lines are still hot (hashing the copy instead measured
        dearer: large copies bypass the cache)."""
        verify = self.verify if verify is None else (verify and self.checksum is not None)
        shard = self._shard_of(key) if shard is None else shard
        k = key.encode()
        with self._env(shard).begin(buffers=True) as txn:
            buf = txn.get(k)
            if buf is None:
                raise KeyError(
                    f"{self.path}: no record for id {key!r} in shard {self.shard_paths[shard].name}"
                )
            bad_length = self.format.length_problem(buf)
            if bad_length:
                raise self._bad_record(key, shard, bad_length)
            view = memoryview(buf)
            payload = view[: self.format.nbytes]
            yield payload
            if verify and self.format.digest(k, payload) != bytes(view[self.format.nbytes :]):
                raise self._bad_record(key, shard, self.format.problem(k, buf) or "checksum mismatch")

    def keys(self) -> list[str]:
        return [k.decode() for k in self._sorted_keys.tolist()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self.locate([key])[0] >= 0)

    def __len__(self) -> int:
        return len(self._sorted_keys)

    def close(self) -> None:
        """Close this process's handles on the shards (they reopen on the next read)."""
        for shard in self.shard_paths:
            release_env(shard)

    def __repr__(self) -> str:
        return (
            f"LMDBCacheReader({str(self.path)!r}, records={len(self)}, shards={len(self.shard_paths)}, "
            f"shape={self.shape}, dtype={self.metadata['dtype']})"
        )
