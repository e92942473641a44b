"""Sharded LMDB tensor cache: one fixed-shape, fixed-dtype tensor per sample id.

Shared by the VAE-latent and DINO-token caches (and anything else that caches one tensor per image).

Layout of a cache directory::

    <cache>/
      metadata.json               global metadata (identity fields + count, corrupt ids, shards); JSON, atomic
      shards/<writer>-<seq>/      LMDB environments (data.mdb, lock.mdb), each holding <= shard_size records
      writers/<writer>.json       per-writer progress: its shards, committed count, corrupt ids, finished flag
      .lock                       flock() target that serialises metadata merges between processes

* Key = the sample id (UTF-8), value = the tensor's raw bytes (C order, little endian). Shape and dtype are
  cache-wide and live in ``metadata.json`` (``shape``, ``dtype``), so a record carries no header: reading one
  is a single ``memcpy``.
* Shards fill in write order. Each writer process (``writer_id``, e.g. ``part002-of-008`` for the third of
  eight parallel jobs) owns its shard files, so parallel jobs never share an LMDB environment and never need
  a cross-process write lock; "merging" is nothing more than the reader opening every ``shards/*`` env.
* Writes are committed in transactions (one per :meth:`LMDBCacheWriter.commit`, i.e. per batch), so an
  interrupted run loses at most the uncommitted batch. On restart every existing shard is scanned and
  :meth:`LMDBCacheWriter.has` skips finished keys; the writer appends to its own last non-full shard.
* Unreadable inputs are recorded with :meth:`LMDBCacheWriter.mark_corrupt` and reported in the metadata
  (``num_corrupt``, ``corrupt``); they are retried on the next run (decoding a bad file fails fast), and an id
  that later succeeds is no longer reported.
* The reader opens its environments lazily and again in each process (after a DataLoader fork or spawn),
  read-only, ``lock=False``, ``readahead=False``, through a per-process registry (py-lmdb forbids opening
  one environment twice in a process). Its key index is a sorted NumPy byte-string array (no
  per-key Python objects, so forked workers do not copy it page by page through refcount writes).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

from utils.checkpoint import atomic_write

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
SHARDS_DIR = "shards"
WRITERS_DIR = "writers"

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
# Fields the writer maintains itself; everything else in the metadata describes the cache contents and must
# match when a run resumes into an existing cache.
VOLATILE_FIELDS = frozenset(
    {"count", "num_corrupt", "corrupt", "shards", "writers", "shard_size", "format_version", "updated"}
)
# Overflow-page rounding and B-tree overhead per record, used to size a shard's map.
_RECORD_OVERHEAD = 4096


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported cache dtype {dtype}; use one of {sorted(DTYPES)}")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unsupported cache dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def record_nbytes(shape: Iterable[int], dtype: str) -> int:
    """Bytes of one record of ``shape`` in ``dtype`` (the value size in LMDB, before page rounding)."""
    return int(np.prod(list(shape))) * torch.empty((), dtype=parse_dtype(dtype)).element_size()


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def estimate_cache_bytes(num_records: int, shape: Iterable[int], dtype: str) -> int:
    """On-disk size estimate: LMDB stores values above ~2 KiB in whole 4 KiB overflow pages."""
    value = record_nbytes(shape, dtype)
    pages = -(-value // 4096) if value > 2048 else 0
    per_record = pages * 4096 + 64 if pages else value + 64
    return num_records * per_record


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``metadata.json`` of a cache directory, with a clear error when it is not a cache."""
    meta_path = Path(path) / METADATA_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{path} is not an LMDB cache: {meta_path} is missing (build it with the preprocessing scripts, "
            "see docs/urepa_preprocessing.md)"
        )
    with open(meta_path) as f:
        return json.load(f)


def list_shards(path: str | os.PathLike) -> list[Path]:
    shards_dir = Path(path) / SHARDS_DIR
    if not shards_dir.is_dir():
        return []
    return sorted(p for p in shards_dir.iterdir() if p.is_dir() and (p / "data.mdb").is_file())


def _open_readonly(shard: Path) -> lmdb.Environment:
    return lmdb.open(
        str(shard), readonly=True, lock=False, readahead=False, meminit=False, max_readers=2048, subdir=True
    )


# py-lmdb refuses to open one environment twice in a process, and a forked DataLoader worker inherits the
# parent's open handles (unusable there). So read-only environments live in one per-process registry that
# every reader shares, and a new process first closes what it inherited (safe with lock=False: that only
# unmaps the child's copy) before opening its own.
_ENVS: dict[str, lmdb.Environment] = {}
_ENVS_PID = os.getpid()


def shared_readonly_env(shard: Path | str) -> lmdb.Environment:
    """This process's read-only handle on ``shard`` (opened on first use)."""
    global _ENVS_PID
    if _ENVS_PID != os.getpid():
        for env in _ENVS.values():
            env.close()
        _ENVS.clear()
        _ENVS_PID = os.getpid()
    key = str(shard)
    env = _ENVS.get(key)
    if env is None:
        env = _open_readonly(Path(shard))
        _ENVS[key] = env
    return env


def release_env(shard: Path | str) -> None:
    """Close this process's shared read-only handle on ``shard`` (before a writer opens it)."""
    if _ENVS_PID == os.getpid():
        env = _ENVS.pop(str(shard), None)
        if env is not None:
            env.close()


@contextmanager
def _readonly(shard: Path) -> Iterator[lmdb.Environment]:
    """The shared handle when one is open, else a temporary one (closed afterwards)."""
    if _ENVS_PID == os.getpid() and str(shard) in _ENVS:
        yield _ENVS[str(shard)]
        return
    env = _open_readonly(shard)
    try:
        yield env
    finally:
        env.close()


def _scan_keys(shard: Path) -> list[bytes]:
    with _readonly(shard) as env, env.begin(buffers=False) as txn:
        return list(txn.cursor().iternext(keys=True, values=False))


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


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    # Through a uint8 view: NumPy has no bfloat16, and the bytes are the same either way.
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def bytes_to_tensor(buf: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """One copy from the (read-only, transaction-bound) LMDB buffer into a fresh tensor."""
    arr = np.frombuffer(buf, dtype=np.uint8).copy()
    return torch.from_numpy(arr).view(dtype).view(shape)


class LMDBCacheWriter:
    """Append tensors to a sharded LMDB cache, resumably.

    Args:
        path: cache directory (created if needed).
        metadata: what the records are. Must contain ``shape`` (of one record) and ``dtype`` (``float16``,
            ``bfloat16`` or ``float32``); everything else (encoder, D, grid, resolution, ...) is free-form but
            must equal the stored metadata when resuming into an existing cache (a mismatch is an error).
        shard_size: records per LMDB environment.
        writer_id: name of this writer's shards; parallel jobs must use distinct ids (the jobs use
            ``part{index:03d}-of-{count:03d}``). A rerun with the same id appends to its last non-full shard.
        commit_every: :meth:`put` commits automatically after this many pending records (jobs also call
            :meth:`commit` after each batch).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: dict[str, Any],
        shard_size: int = 10000,
        writer_id: str = "part000-of-001",
        commit_every: int = 256,
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
        self._check_or_init_metadata()

        self._keys: set[bytes] = set()
        for shard in list_shards(self.path):
            try:
                self._keys.update(_scan_keys(shard))
            except lmdb.Error:
                # a parallel job may be creating this shard right now; its ids are that job's part anyway
                if shard.name.startswith(f"{writer_id}-"):
                    raise
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
            format_version=FORMAT_VERSION,
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
        with _readonly(shard) as env:
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
        per = self.nbytes + _RECORD_OVERHEAD + 256
        return int(self.shard_size * per * 1.1) + (32 << 20)

    def _open_current_shard(self) -> None:
        if self._shards:
            last = self.path / SHARDS_DIR / self._shards[-1]
            count = self._shard_entries(last)
            if count < self.shard_size:
                release_env(last)
                self._env = lmdb.open(
                    str(last), map_size=max(self._map_size(), _file_size(last)), subdir=True
                )
                self._env_count = count
                return
        name = f"{self.writer_id}-{len(self._shards):05d}"
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
        self._pending.append((k, tensor_to_bytes(tensor)))
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


def _file_size(shard: Path) -> int:
    data = shard / "data.mdb"
    return data.stat().st_size if data.is_file() else 0


class LMDBCacheReader:
    """Read-only access to a cache built by :class:`LMDBCacheWriter`.

    ``reader.get(id)`` returns a fresh tensor with the stored dtype (fp16/bf16 are preserved) and shape.
    Environments are opened on first use in each process, so the reader can be created in the main process
    and used in DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self.dtype = parse_dtype(self.metadata["dtype"])
        self.shape = tuple(int(s) for s in self.metadata["shape"])
        self.shard_paths = list_shards(self.path)
        keys: list[bytes] = []
        owners: list[np.ndarray] = []
        for i, shard in enumerate(self.shard_paths):
            shard_keys = _scan_keys(shard)
            keys.extend(shard_keys)
            owners.append(np.full(len(shard_keys), i, dtype=np.int32))
        key_array = np.array(keys, dtype=np.bytes_) if keys else np.array([], dtype="S1")
        order = np.argsort(key_array, kind="stable")
        self._sorted_keys = key_array[order]
        self._owners = (np.concatenate(owners) if owners else np.zeros(0, np.int32))[order]
        if len(self._sorted_keys) > 1 and (self._sorted_keys[1:] == self._sorted_keys[:-1]).any():
            dup = self._sorted_keys[1:][self._sorted_keys[1:] == self._sorted_keys[:-1]][0].decode()
            raise ValueError(f"{self.path}: key {dup!r} is stored in more than one shard (corrupt cache)")

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

    def get_bytes(self, key: str, shard: int | None = None) -> bytes:
        """The raw record (for benchmarks and tools)."""
        shard = self._shard_of(key) if shard is None else shard
        with self._env(shard).begin(buffers=False) as txn:
            value = txn.get(key.encode())
        if value is None:
            raise KeyError(f"{self.path}: no record for id {key!r} in shard {self.shard_paths[shard].name}")
        return value

    def get(self, key: str, shard: int | None = None) -> torch.Tensor:
        """The tensor stored under ``key`` (``shard`` from :meth:`locate` skips the index lookup)."""
        shard = self._shard_of(key) if shard is None else shard
        with self._env(shard).begin(buffers=True) as txn:
            buf = txn.get(key.encode())
            if buf is None:
                raise KeyError(
                    f"{self.path}: no record for id {key!r} in shard {self.shard_paths[shard].name}"
                )
            return bytes_to_tensor(buf, self.dtype, self.shape)

    def read_into(self, key: str, out: torch.Tensor, shard: int | None = None) -> torch.Tensor:
        """Copy the record straight into ``out`` (contiguous, the cache's shape and dtype): one copy, used to
        fill a preallocated batch without a per-sample tensor."""
        shard = self._shard_of(key) if shard is None else shard
        with self._env(shard).begin(buffers=True) as txn:
            buf = txn.get(key.encode())
            if buf is None:
                raise KeyError(
                    f"{self.path}: no record for id {key!r} in shard {self.shard_paths[shard].name}"
                )
            dst = out.view(-1).view(torch.uint8).numpy()
            if dst.nbytes != len(buf):
                raise ValueError(f"{self.path}: record {key!r} has {len(buf)} bytes, the output {dst.nbytes}")
            dst[:] = np.frombuffer(buf, dtype=np.uint8)
        return out

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
