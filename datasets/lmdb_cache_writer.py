"""LMDB tensor cache, part 2: :class:`LMDBCacheWriter`, resumable appends by parallel writer processes.

The layout, the record format and the guarantees are described in datasets/lmdb_cache.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import torch

from datasets.lmdb_cache_format import (
    DEFAULT_CHECKSUM,
    FORMAT_VERSION,
    METADATA_FILE,
    SHARDS_DIR,
    VOLATILE_FIELDS,
    WRITERS_DIR,
    RecordFormat,
    data_file_size,
    dtype_name,
    list_shards,
    parse_dtype,
    read_metadata,
    readonly_env,
    record_nbytes,
    release_env,
    scan_keys,
    unopenable_error,
)
from utils.checkpoint import atomic_write
from utils.logging import get_logger

logger = get_logger("lmdb_cache")

# Overflow-page rounding and B-tree overhead per record, used to size a shard's map.
_RECORD_OVERHEAD = 4096


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


class LMDBCacheWriter:
    """Append tensors to a sharded LMDB cache, resumably.

    Args:
        path: cache directory (created if needed).
        metadata: what the records are. Must contain ``shape`` (of one record) and ``dtype`` (``float16``,
            ``bfloat16``, ``float32``, ``int16`` or ``int32``); everything else (encoder, D, grid, resolution, ...) is free-form but
            must equal the stored metadata when resuming into an existing cache (a mismatch is an error).
        shard_size: records per LMDB environment.
        writer_id: name of this writer's shards; parallel jobs must use distinct ids (the jobs use
            ``part{index:03d}-of-{count:03d}``). A rerun with the same id appends to its last non-full shard.
        commit_every: :meth:`put` commits automatically after this many pending records (jobs also call
            :meth:`commit` after each batch).
        checksum: per-record checksum of a new cache (``xxh3_64``, ``crc32``, or None for the checksum-less
            format 1 of older caches). An existing cache keeps its own, so that it never holds a mix.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: dict[str, Any],
        shard_size: int = 10000,
        writer_id: str = "part000-of-001",
        commit_every: int = 256,
        checksum: str | None = DEFAULT_CHECKSUM,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        if "shape" not in metadata or "dtype" not in metadata:
            raise ValueError(f"cache metadata needs 'shape' and 'dtype', got keys {sorted(metadata)}")
        if "/" in writer_id or not writer_id:
            raise ValueError(f"writer_id must be a plain non-empty name, got {writer_id!r}")
        self.path = Path(path)
        self.writer_id = writer_id
        self.shard_size = int(shard_size)
        self.commit_every = int(commit_every)
        self.identity = {k: v for k, v in metadata.items() if k not in VOLATILE_FIELDS}
        self.identity["shape"] = [int(s) for s in metadata["shape"]]
        self.shape = tuple(self.identity["shape"])
        self.dtype = parse_dtype(metadata["dtype"])
        self.nbytes = record_nbytes(self.shape, metadata["dtype"])
        (self.path / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        (self.path / WRITERS_DIR).mkdir(parents=True, exist_ok=True)
        self._lock_path = self.path / ".lock"
        self.checksum = checksum
        self._check_or_init_metadata()
        self.format = RecordFormat(self.shape, metadata["dtype"], self.checksum)

        self._keys: set[bytes] = set()
        for shard in list_shards(self.path):
            try:
                self._keys.update(scan_keys(shard))
            except lmdb.Error as err:
                # A parallel job may be creating this shard right now (an empty file fails to open); its ids
                # are that job's part anyway. A truncated shard (TruncatedShardError) is an error for all.
                if shard.name.startswith(f"{writer_id}-"):
                    raise unopenable_error(shard, err) from err
        self.num_existing = len(self._keys)

        state_path = self.path / WRITERS_DIR / f"{writer_id}.json"
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        self._shards: list[str] = [
            s for s in state.get("shards", []) if (self.path / SHARDS_DIR / s).is_dir()
        ]
        for shard in list_shards(self.path):  # shards created before a crash that the state file missed
            if shard.name.startswith(f"{writer_id}-") and shard.name not in self._shards:
                self._shards.append(shard.name)
        self._shards.sort()
        # retried on this run; ids that fail again are re-added by mark_corrupt
        self.corrupt: dict[str, str] = {}
        self._previous_corrupt = {k: v for k, v in state.get("corrupt", {}).items()}
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_keys: set[bytes] = set()
        self._env: lmdb.Environment | None = None
        self._env_count = 0
        self._closed_counts: dict[str, int] = {}
        self.num_written = 0
        self._closed = False
        self._open_current_shard()
        self._save_state(finished=False)

    # ----------------------------------------------------------------------------------------- metadata
    def _check_or_init_metadata(self) -> None:
        with _file_lock(self._lock_path):
            meta_path = self.path / METADATA_FILE
            if meta_path.is_file():
                existing = json.loads(meta_path.read_text())
                if existing.get("checksum", None) != self.checksum:
                    self.checksum = existing.get("checksum")
                    if self.checksum is None:
                        logger.warning(
                            "%s was built before per-record checksums (format 1): resuming in that format; "
                            "build into a new directory to get checksums",
                            self.path,
                        )
                diffs = {
                    k: (existing.get(k), v)
                    for k, v in self.identity.items()
                    if k in existing and existing[k] != v
                }
                missing = sorted(k for k in existing if k not in VOLATILE_FIELDS and k not in self.identity)
                if diffs or missing:
                    lines = [f"  {k}: cache has {a!r}, this run has {b!r}" for k, (a, b) in diffs.items()]
                    lines += [f"  {k}: cache has {existing[k]!r}, this run does not set it" for k in missing]
                    raise ValueError(
                        f"cannot resume into {self.path}: it was built with different settings\n"
                        + "\n".join(lines)
                        + "\nuse another output directory (or delete this one) to build a new cache"
                    )
            else:
                _write_json(meta_path, self._merged_metadata({}))

    def _merged_metadata(self, writers: dict[str, dict[str, Any]]) -> dict[str, Any]:
        corrupt: dict[str, str] = {}
        for state in writers.values():
            corrupt.update(state.get("corrupt", {}))
        shards = sorted(s for state in writers.values() for s in state.get("shards", []))
        meta = dict(self.identity)
        count = sum(int(state.get("count", 0)) for state in writers.values())
        # an id a later run (another writer id) stored is no longer corrupt
        stored = {k.decode() for k in getattr(self, "_keys", set())}
        corrupt = {k: v for k, v in corrupt.items() if k not in stored}
        meta.update(
            format_version=FORMAT_VERSION if self.checksum else 1,
            checksum=self.checksum,
            shard_size=self.shard_size,
            count=count,
            num_corrupt=len(corrupt),
            corrupt=dict(sorted(corrupt.items())),
            shards=shards,
            writers={
                w: {"count": s.get("count", 0), "finished": s.get("finished", False)}
                for w, s in sorted(writers.items())
            },
            updated=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        return meta

    def _save_state(self, finished: bool) -> None:
        corrupt = dict(self._previous_corrupt)
        corrupt.update(self.corrupt)
        state = {
            "shards": self._shards,
            "count": self._committed_count(),
            "corrupt": dict(sorted(corrupt.items())),
            "finished": finished,
            # what this writer's records are, for the reader to check metadata.json against
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
        }
        _write_json(self.path / WRITERS_DIR / f"{self.writer_id}.json", state)

    def _committed_count(self) -> int:
        # closed shards never change: count them once
        for name in self._shards:
            if name not in self._closed_counts and not (self._env is not None and name == self._shards[-1]):
                self._closed_counts[name] = self._shard_entries(self.path / SHARDS_DIR / name)
        open_count = self._env_count if self._env is not None else 0
        return sum(self._closed_counts.get(n, 0) for n in self._shards) + open_count

    @staticmethod
    def _shard_entries(shard: Path) -> int:
        with readonly_env(shard) as env:
            return int(env.stat()["entries"])

    def update_metadata(self) -> dict[str, Any]:
        """Merge every writer's progress into ``metadata.json`` (under a file lock); returns it."""
        with _file_lock(self._lock_path):
            writers = {}
            for f in sorted((self.path / WRITERS_DIR).glob("*.json")):
                writers[f.stem] = json.loads(f.read_text())
            meta = self._merged_metadata(writers)
            _write_json(self.path / METADATA_FILE, meta)
        return meta

    # ------------------------------------------------------------------------------------------- shards
    def _map_size(self) -> int:
        per = self.format.value_nbytes + _RECORD_OVERHEAD + 256
        return int(self.shard_size * per * 1.1) + (32 << 20)

    def _open_current_shard(self) -> None:
        if self._shards:
            last = self.path / SHARDS_DIR / self._shards[-1]
            count = self._shard_entries(last)
            if count < self.shard_size:
                release_env(last)
                self._env = lmdb.open(
                    str(last), map_size=max(self._map_size(), data_file_size(last)), subdir=True
                )
                self._env_count = count
                return
        # after the highest existing number, not the count: a deleted (bad) shard leaves a gap
        number = max((int(n.rsplit("-", 1)[1]) + 1 for n in self._shards), default=0)
        name = f"{self.writer_id}-{number:05d}"
        self._env = lmdb.open(str(self.path / SHARDS_DIR / name), map_size=self._map_size(), subdir=True)
        self._env_count = 0
        self._shards.append(name)

    def _rotate(self) -> None:
        assert self._env is not None
        self._env.sync()
        self._env.close()
        self._env = None
        self._open_current_shard()
        self._save_state(finished=False)

    # ---------------------------------------------------------------------------------------------- API
    def has(self, key: str) -> bool:
        """True when ``key`` is stored (committed, pending in this writer, or in any shard at start)."""
        k = key.encode()
        return k in self._keys or k in self._pending_keys

    def __contains__(self, key: str) -> bool:
        return self.has(key)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Queue one record; raises on a wrong shape/dtype or a key that is already stored."""
        if self._closed:
            raise RuntimeError("LMDBCacheWriter.put after close()")
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise ValueError(
                f"{self.path}: record {key!r} has shape {tuple(tensor.shape)} dtype {tensor.dtype}, "
                f"the cache stores shape {self.shape} dtype {self.dtype}"
            )
        k = key.encode()
        if not k or len(k) > 511:
            raise ValueError(f"cache keys must be 1..511 bytes of UTF-8, got {key!r}")
        if self.has(key):
            raise KeyError(f"{self.path}: key {key!r} is already in the cache (check writer.has(key) first)")
        self._pending.append((k, self.format.encode(k, tensor)))
        self._pending_keys.add(k)
        self.corrupt.pop(key, None)
        self._previous_corrupt.pop(key, None)
        if len(self._pending) >= self.commit_every:
            self.commit()

    def mark_corrupt(self, key: str, reason: str) -> None:
        """Record an input that could not be read; it is counted in the metadata, never silently dropped."""
        self.corrupt[key] = reason

    def commit(self) -> None:
        """Write the pending records (one transaction per shard touched) and persist this writer's state."""
        while self._pending:
            assert self._env is not None
            room = self.shard_size - self._env_count
            if room <= 0:
                self._rotate()
                continue
            chunk = self._pending[:room]
            self._write_chunk(chunk)
            self._pending = self._pending[len(chunk) :]
            for k, _ in chunk:
                self._pending_keys.discard(k)
                self._keys.add(k)
            self._env_count += len(chunk)
            self.num_written += len(chunk)
            if self._env_count >= self.shard_size:
                self._rotate()
        self._save_state(finished=False)

    def _write_chunk(self, chunk: list[tuple[bytes, bytes]]) -> None:
        assert self._env is not None
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for k, v in chunk:
                        if not txn.put(k, v, overwrite=False):
                            raise KeyError(f"{self.path}: key {k.decode()!r} already in shard")
                return
            except lmdb.MapFullError:
                # the transaction was aborted as a whole; grow the map and redo it
                self._env.set_mapsize(self._env.info()["map_size"] * 2)

    def close(self, finished: bool = True) -> dict[str, Any]:
        """Commit, close the shard, and merge this writer's progress into ``metadata.json``."""
        if self._closed:
            return read_metadata(self.path)
        self.commit()
        assert self._env is not None
        self._env.sync()
        self._env.close()
        self._env = None
        # an empty trailing shard (a rerun with nothing left to do) is not worth keeping
        last = self.path / SHARDS_DIR / self._shards[-1]
        if self._shard_entries(last) == 0:
            for f in last.iterdir():
                f.unlink()
            last.rmdir()
            self._shards.pop()
        self._closed = True
        self._save_state(finished=finished)
        return self.update_metadata()

    def __enter__(self) -> LMDBCacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # on an exception keep what was committed, mark the writer unfinished, and let the error propagate
        if exc_type is None:
            self.close(finished=True)
        else:
            self._pending.clear()
            self._pending_keys.clear()
            self.close(finished=False)
