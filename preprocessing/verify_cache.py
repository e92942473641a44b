"""Check a whole LMDB cache (VAE latents, DINO tokens): every shard's file size, every record's length and
checksum, metadata.json against the records. Reports the bad shards and keys; exit status 1 if any.

    python preprocessing/verify_cache.py data/urepa/latents_200k data/urepa/dino_vitl14_224_200k
    python preprocessing/verify_cache.py CACHE --json report.json      # every bad key, machine-readable
    python preprocessing/verify_cache.py CACHE --delete_bad             # then rerun the cache-building command

``--delete_bad`` deletes the bad records and the truncated shards, so that rerunning the same cache-building
command (same --csv and output directory) recomputes exactly those records; nothing else is touched.
Caches built before checksums (format 1) get the length checks only.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

import lmdb

from datasets.lmdb_cache import LMDBCacheReader
from datasets.lmdb_cache_format import (
    CacheCorruptError,
    MetadataMismatchError,
    RecordFormat,
    list_shards,
    open_shard_readonly,
    read_metadata,
    release_env,
)
from utils.logging import progress


@dataclass
class CacheReport:
    path: str
    records: int = 0
    checked_checksums: bool = True
    bad_shards: dict[str, str] = field(default_factory=dict)  # shard -> why it cannot be read
    bad_records: dict[str, dict[str, str]] = field(default_factory=dict)  # key -> {shard, problem}
    metadata_error: str | None = None
    deleted_records: int = 0
    deleted_shards: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.bad_shards or self.bad_records or self.metadata_error)


def verify_cache(path: str | Path, delete_bad: bool = False, show_progress: bool = True) -> CacheReport:
    """Check every shard and record of the cache at ``path`` (see the module docstring)."""
    path = Path(path)
    meta = read_metadata(path)
    fmt = RecordFormat(meta["shape"], meta["dtype"], meta.get("checksum"))
    report = CacheReport(str(path), checked_checksums=fmt.checksum is not None)
    try:  # metadata.json against the writers' notes and a sample of records
        LMDBCacheReader(path, sample_records=16).close()
    except MetadataMismatchError as err:
        report.metadata_error = str(err)
    except CacheCorruptError:
        pass  # a bad shard: found and reported below
    for shard in list_shards(path):
        release_env(shard)
        try:
            env = open_shard_readonly(shard)
        except (CacheCorruptError, lmdb.Error) as err:
            report.bad_shards[shard.name] = str(err)
            continue
        bad: list[bytes] = []
        try:
            with env.begin(buffers=True) as txn:
                entries = txn.stat()["entries"]
                cursor = txn.cursor()
                bar = progress(total=entries, desc=shard.name, unit="rec", disable=not show_progress)
                for key, value in cursor:
                    report.records += 1
                    problem = fmt.problem(bytes(key), value)
                    if problem:
                        bad.append(bytes(key))
                        report.bad_records[bytes(key).decode()] = {"shard": shard.name, "problem": problem}
                    bar.update(1)
                bar.close()
        finally:
            env.close()
        if delete_bad and bad and not report.metadata_error:
            writable = lmdb.open(str(shard), subdir=True)
            with writable.begin(write=True) as txn:
                for key in bad:
                    txn.delete(key)
            writable.close()
            report.deleted_records += len(bad)
    if delete_bad and not report.metadata_error:  # with wrong metadata every record looks bad: delete nothing
        for name in report.bad_shards:
            shutil.rmtree(path / "shards" / name)
            report.deleted_shards.append(name)
    return report


def print_report(report: CacheReport, limit: int = 20) -> None:
    status = "OK" if report.ok else "BAD"
    checks = "lengths and checksums" if report.checked_checksums else "lengths only (no checksums: format 1)"
    print(f"[{status}] {report.path}: {report.records} records read, {checks}")
    if report.metadata_error:
        print(f"  metadata: {report.metadata_error}")
        print("  (records are judged by metadata.json: fix it first; --delete_bad deletes nothing meanwhile)")
    for name, why in report.bad_shards.items():
        print(f"  bad shard {name}: {why}")
    for i, (key, info) in enumerate(report.bad_records.items()):
        if i == limit:
            print(f"  ... and {len(report.bad_records) - limit} more bad records (--json lists all)")
            break
        print(f"  bad record {key!r} in shard {info['shard']}: {info['problem']}")
    if report.deleted_records or report.deleted_shards:
        print(
            f"  deleted {report.deleted_records} bad records and {len(report.deleted_shards)} bad shards: rerun the "
            "same cache-building command to recompute them"
        )
    elif not report.ok:
        print("  rerun with --delete_bad, then rerun the cache-building command, to recompute the bad ones")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("caches", nargs="+", help="Cache directories (each holds metadata.json and shards/).")
    parser.add_argument(
        "--json", default=None, help="Also write the full report (every bad key) to this file."
    )
    parser.add_argument(
        "--delete_bad",
        action="store_true",
        help="Delete bad records and truncated shards so that rerunning the build recomputes them.",
    )
    parser.add_argument("--no_progress", action="store_true", help="Disable the progress bars.")
    args = parser.parse_args(argv)
    reports = [
        verify_cache(c, delete_bad=args.delete_bad, show_progress=not args.no_progress) for c in args.caches
    ]
    for report in reports:
        print_report(report)
    if args.json:
        out: list[dict[str, Any]] = [asdict(r) | {"ok": r.ok} for r in reports]
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
