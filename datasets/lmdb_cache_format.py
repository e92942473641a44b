"""LMDB tensor cache, part 1: the record format, the integrity checks and the read-only shard handles.

Shared by the writer (datasets/lmdb_cache_writer.py) and the reader (datasets/lmdb_cache.py, whose docstring
describes the cache layout and its guarantees): cache-wide constants and dtypes, :class:`RecordFormat` (a
record's bytes and checksum), the cache errors, ``metadata.json`` / shard listing, the truncation check that
keeps a short ``data.mdb`` from raising SIGBUS, and the per-process registry of read-only environments.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

from utils.cli import UserError

try:  # xxh3 hashes at memory speed (~50 GB/s); zlib's crc32 is ~10x slower (see docs/urepa_preprocessing.md)
    import xxhash
except ImportError:  # pragma: no cover - xxhash is in requirements.txt
    xxhash = None

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


class CacheCorruptError(UserError, ValueError):
    """A cache file or record that cannot be used as it is; the message names it and says how to repair it.
    A user error: entry points end with the message and exit code 2."""


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
    have = data_file_size(shard)
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
            raise unopenable_error(Path(shard), err) from err
        _ENVS[key] = env
    return env


def release_env(shard: Path | str) -> None:
    """Close this process's shared read-only handle on ``shard`` (before a writer opens it)."""
    if _ENVS_PID == os.getpid():
        env = _ENVS.pop(str(shard), None)
        if env is not None:
            env.close()


@contextmanager
def readonly_env(shard: Path) -> Iterator[lmdb.Environment]:
    """The shared handle when one is open, else a temporary one (closed afterwards)."""
    if _ENVS_PID == os.getpid() and str(shard) in _ENVS:
        yield _ENVS[str(shard)]
        return
    env = open_shard_readonly(shard)
    try:
        yield env
    finally:
        env.close()


def scan_keys(shard: Path) -> list[bytes]:
    with readonly_env(shard) as env, env.begin(buffers=False) as txn:
        return list(txn.cursor().iternext(keys=True, values=False))


def unopenable_error(shard: Path, err: lmdb.Error) -> CacheCorruptError:
    return CacheCorruptError(f"cannot open LMDB shard {shard}: {err}. {rebuild_hint(shard)}")


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    # Through a uint8 view: NumPy has no bfloat16, and the bytes are the same either way.
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def data_file_size(shard: Path) -> int:
    data = shard / "data.mdb"
    return data.stat().st_size if data.is_file() else 0
