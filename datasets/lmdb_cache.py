"""Sharded LMDB tensor cache: one fixed-shape, fixed-dtype tensor per sample id.

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
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

from utils.checkpoint import atomic_write
from utils.logging import get_logger

try:  # xxh3 hashes at memory speed (~50 GB/s); zlib's crc32 is ~10x slower (see docs/urepa_preprocessing.md)
    import xxhash
except ImportError:  # pragma: no cover - xxhash is in requirements.txt
    xxhash = None

logger = get_logger("lmdb_cache")

FORMAT_VERSION = 2  # 2: values end with a checksum; 1: bare tensor bytes (read without verification)
CHECKSUM_BYTES = {"xxh3_64": 8, "crc32": 4}
DEFAULT_CHECKSUM = "xxh3_64" if xxhash is not None else "crc32"
METADATA_FILE = "metadata.json"
SHARDS_DIR = "shards"
WRITERS_DIR = "writers"

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "int16": torch.int16,  # token ids (e.g. DinoVQ codes of a codebook of <= 32768 entries)
    "int32": torch.int32,
}
# Fields the writer maintains itself; everything else in the metadata describes the cache contents and must
# match when a run resumes into an existing cache.
VOLATILE_FIELDS = frozenset(
    {
        "count",
        "num_corrupt",
        "corrupt",
        "shards",
        "writers",
        "shard_size",
        "format_version",
        "updated",
        "checksum",
    }
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


class CacheCorruptError(ValueError):
    """A cache file or record that cannot be used as it is; the message names it and says how to repair it."""


class TruncatedShardError(CacheCorruptError):
    """A shard's ``data.mdb`` is shorter than its own meta page says (reading it would raise SIGBUS)."""


class MetadataMismatchError(CacheCorruptError):
    """metadata.json does not describe the records (edited, or from another cache); the message names the field."""


class CorruptRecordError(CacheCorruptError):
    """One record with a wrong length or checksum (``key``, ``shard``: where)."""

    def __init__(self, message: str, key: str, shard: Path) -> None:
        super().__init__(message)
        self.key = key
        self.shard = shard


def rebuild_hint(shard: Path) -> str:
    return (
        f"To rebuild it: delete {shard} and rerun the same cache-building command (same --csv and output "
        "directory; preprocessing/build_caches.py, encode_vae_latents.py or build_dino_cache.py): it recomputes "
        "only the records that are missing. `python preprocessing/verify_cache.py "
        f"{shard.parent.parent}` checks the other shards."
    )


class RecordFormat:
    """How one record is stored: the tensor's bytes, then (``checksum`` not None) a checksum of
    (dtype, shape, key, bytes) -- so a record read under another key, dtype or shape fails too.

    ``checksum=None`` is the format-1 layout of older caches: the bytes only.
    """

    def __init__(self, shape: Iterable[int], dtype: str, checksum: str | None) -> None:
        if checksum is not None and checksum not in CHECKSUM_BYTES:
            raise ValueError(f"unknown cache checksum {checksum!r}; known: {sorted(CHECKSUM_BYTES)}")
        if checksum == "xxh3_64" and xxhash is None:
            raise ImportError("this cache uses xxh3_64 checksums: `pip install xxhash` (in requirements.txt)")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.checksum = checksum
        self.nbytes = record_nbytes(self.shape, dtype)
        self.value_nbytes = self.nbytes + CHECKSUM_BYTES.get(checksum, 0)
        header = json.dumps([dtype, list(self.shape)]).encode()
        self._seed = xxhash.xxh3_64_intdigest(header) if checksum == "xxh3_64" else zlib.crc32(header)

    def digest(self, key: bytes, payload: Any) -> bytes:
        if self.checksum == "xxh3_64":
            seed = xxhash.xxh3_64_intdigest(key, seed=self._seed)
            return xxhash.xxh3_64_intdigest(payload, seed=seed).to_bytes(8, "little")
        return zlib.crc32(payload, zlib.crc32(key, self._seed)).to_bytes(4, "little")

    def encode(self, key: bytes, tensor: torch.Tensor) -> bytes:
        payload = tensor_to_bytes(tensor)
        return payload + self.digest(key, payload) if self.checksum else payload

    def length_problem(self, value: Any) -> str | None:
        if len(value) == self.value_nbytes:
            return None
        return (
            f"{len(value)} bytes, but metadata.json's shape {list(self.shape)} x dtype {self.dtype} "
            f"gives {self.nbytes}"
            + (f" (+{self.value_nbytes - self.nbytes} checksum)" if self.checksum else "")
        )

    def checksum_ok(self, key: bytes, value: Any) -> bool:
        """Whether the trailer matches (length already checked; always True without checksums)."""
        if not self.checksum:
            return True
        view = memoryview(value)
        return self.digest(key, view[: self.nbytes]) == bytes(view[self.nbytes :])

    def problem(self, key: bytes, value: Any, verify: bool = True) -> str | None:
        """None when ``value`` is a good record for ``key``, else what is wrong with it."""
        bad_length = self.length_problem(value)
        if bad_length:
            return bad_length
        if verify and not self.checksum_ok(key, value):
            return (
                f"{self.checksum} checksum mismatch: the bytes changed after they were written (or were "
                "written under another key, dtype or shape)"
            )
        return None


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


def open_shard_readonly(shard: Path) -> lmdb.Environment:
    """A read-only handle on ``shard`` whose file size was checked (:func:`check_shard_size`); an LMDB that
    cannot be opened at all raises ``lmdb.Error``."""
    env = lmdb.open(
        str(shard), readonly=True, lock=False, readahead=False, meminit=False, max_readers=2048, subdir=True
    )
    try:
        check_shard_size(shard, env)
    except TruncatedShardError:
        env.close()
        raise
    return env


def check_shard_size(shard: Path, env: lmdb.Environment) -> None:
    """Raise :class:`TruncatedShardError` if ``data.mdb`` is shorter than the pages its newest meta page uses.

    LMDB maps the whole file and reads pages through the mapping: a page past the end of a truncated file
    raises SIGBUS ("Bus error"), which kills the process before Python can report anything. Opening is safe --
    LMDB reads the two meta pages with ``pread`` and fails cleanly (``lmdb.Error``) when they are missing --
    and ``env.info()``/``env.stat()`` only read those meta pages. The newest meta page (highest txn id, the one
    ``info()`` reports) records ``last_pgno``, the highest page any committed B-tree page or overflow value
    uses, and LMDB writes data pages before the meta page that points to them. So every readable record lies
    in the first ``(last_pgno + 1) * psize`` bytes, and a file at least that long is never read past its end
    (pages after it are free or from an aborted write); a shorter file is truncated.
    """
    need = (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])
    have = _file_size(shard)
    if have < need:
        raise TruncatedShardError(
            f"LMDB shard {shard / 'data.mdb'} is truncated: {have:,} bytes on disk, but its last committed "
            f"transaction uses {need:,} bytes (a copy cut short, a full disk or a file-system error); its "
            f"records cannot be read. {rebuild_hint(shard)}"
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
        try:
            env = open_shard_readonly(Path(shard))
        except lmdb.Error as err:
            raise _unopenable(Path(shard), err) from err
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
    env = open_shard_readonly(shard)
    try:
        yield env
    finally:
        env.close()


def _scan_keys(shard: Path) -> list[bytes]:
    with _readonly(shard) as env, env.begin(buffers=False) as txn:
        return list(txn.cursor().iternext(keys=True, values=False))


def _unopenable(shard: Path, err: lmdb.Error) -> CacheCorruptError:
    return CacheCorruptError(f"cannot open LMDB shard {shard}: {err}. {rebuild_hint(shard)}")


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
                self._keys.update(_scan_keys(shard))
            except lmdb.Error as err:
                # A parallel job may be creating this shard right now (an empty file fails to open); its ids
                # are that job's part anyway. A truncated shard (TruncatedShardError) is an error for all.
                if shard.name.startswith(f"{writer_id}-"):
                    raise _unopenable(shard, err) from err
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
        per = self.format.value_nbytes + _RECORD_OVERHEAD + 256
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


def _file_size(shard: Path) -> int:
    data = shard / "data.mdb"
    return data.stat().st_size if data.is_file() else 0


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
                shard_keys = _scan_keys(shard)
            except lmdb.Error as err:
                raise _unopenable(shard, err) from err
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
