"""LMDB caches with bad data (issue 12): truncated shards, silently corrupted records, edited metadata, caches
from before checksums. Each gets a clear error or a counted skip, and nothing already written is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from datasets.lmdb_cache import (
    CacheCorruptError,
    CorruptRecordError,
    LMDBCacheReader,
    LMDBCacheWriter,
    MetadataMismatchError,
    TruncatedShardError,
    read_metadata,
    release_env,
)
from preprocessing.verify_cache import main as verify_main
from preprocessing.verify_cache import verify_cache

REPO = Path(__file__).resolve().parents[2]
META = {"encoder": "test", "shape": [64, 64], "dtype": "float32"}  # 16 KiB records: several pages each


def _values(n: int = 20) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"id{i:03d}": torch.randn(64, 64, generator=g) for i in range(n)}


def _build(path: Path, values: dict[str, torch.Tensor], **kwargs) -> None:
    with LMDBCacheWriter(path, kwargs.pop("meta", META), shard_size=10, **kwargs) as w:
        for k, v in values.items():
            if not w.has(k):
                w.put(k, v)


def _shards(path: Path) -> list[Path]:
    return sorted((path / "shards").iterdir())


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def _rewrite(shard: Path, key: str, value: bytes) -> None:
    """Overwrite a stored value behind the cache's back (what a bad disk or a stray write would do)."""
    release_env(shard)
    env = lmdb.open(str(shard), subdir=True)
    with env.begin(write=True) as txn:
        txn.put(key.encode(), value)
    env.close()


def test_truncated_shard_is_a_clear_error_not_a_bus_error(tmp_path):
    cache = tmp_path / "c"
    values = _values()
    _build(cache, values)
    first = _shards(cache)[0]
    data = first / "data.mdb"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    # in a subprocess: without the check, the key scan dies of SIGBUS (rc -7), which would take pytest with it
    for opener in ("LMDBCacheReader(path)", "LMDBCacheWriter(path, META, shard_size=10)"):
        proc = _run(
            "import sys\nfrom datasets.lmdb_cache import *\n"
            f"path, META = {str(cache)!r}, {META!r}\n"
            f"try:\n    {opener}\nexcept TruncatedShardError as err:\n    print(err); sys.exit(3)\n"
        )
        assert proc.returncode == 3, (opener, proc.returncode, proc.stderr[-2000:])
        assert f"{data} is truncated" in proc.stdout and f"delete {first} and rerun" in proc.stdout
    with pytest.raises(TruncatedShardError):
        LMDBCacheReader(cache)  # in-process: safe now
    report = verify_cache(cache, show_progress=False)
    assert list(report.bad_shards) == [first.name] and not report.bad_records and not report.ok
    # the documented repair: delete the shard, rerun the build; the other shard's records are untouched
    assert verify_main([str(cache), "--delete_bad", "--no_progress"]) == 1  # reports, then deletes the shard
    assert not first.exists()
    reader = LMDBCacheReader(cache)
    assert len(reader) == 10
    kept = {k: reader.get(k) for k in reader.keys()}
    _build(cache, values)  # the rerun recomputes exactly the missing records
    reader = LMDBCacheReader(cache)
    assert len(reader) == 20 and all(torch.equal(reader.get(k), v) for k, v in values.items())
    assert all(torch.equal(reader.get(k), v) for k, v in kept.items())
    assert read_metadata(cache)["count"] == 20


def test_shard_too_short_for_its_meta_pages_names_the_shard(tmp_path):
    cache = tmp_path / "c"
    _build(cache, _values(3))
    shard = _shards(cache)[0]
    with open(shard / "data.mdb", "r+b") as f:
        f.truncate(100)
    with pytest.raises(
        CacheCorruptError, match=rf"cannot open LMDB shard {shard}.*rerun the same cache-building"
    ):
        LMDBCacheReader(cache)


def test_corrupted_record_is_detected_skipped_counted_or_fatal(tmp_path):
    from datasets.sd15_aligned import SD15AlignedDataset
    from tests.urepa.fake_data import FakeAlignedDataset, write_lmdb_caches

    data = write_lmdb_caches(tmp_path / "caches", n=8)
    lat_dir = Path(data["latent_dir"])
    reader = LMDBCacheReader(lat_dir)
    victim = reader.keys()[3]
    shard = reader.shard_paths[int(reader.locate([victim])[0])]
    value = bytearray(reader.get_value(victim))
    value[0:2] = np.float16(65504).tobytes()  # the case: one latent overwritten with fp16 max
    _rewrite(shard, victim, bytes(value))

    with pytest.raises(
        CorruptRecordError,
        match=rf"{lat_dir}: record '{victim}' in shard {shard.name} is corrupt: xxh3_64 checksum mismatch",
    ):
        LMDBCacheReader(lat_dir).get(victim)
    args = (data["csv"], data["latent_dir"], data["dino_dir"], data["clip_embeddings"])
    ds = SD15AlignedDataset(*args, cfg_dropout=0.0)
    batch = ds.get_batch(list(range(len(ds))))
    assert batch["latent"].shape[0] == 7 and ds.num_bad_records == 1  # skipped and counted
    fake = FakeAlignedDataset(n=8)
    kept = [i for i in range(8) if ds.sample_id(i) != victim]
    torch.testing.assert_close(
        batch["latent"], fake.latents[[int(ds.sample_id(i).split("_")[1]) for i in kept]]
    )
    assert batch["class_id"].tolist() == [
        int(fake.class_ids[int(ds.sample_id(i).split("_")[1])]) for i in kept
    ]
    strict = SD15AlignedDataset(*args, cfg_dropout=0.0, on_bad_record="error")
    with pytest.raises(CorruptRecordError, match=victim):
        strict.get_batch(list(range(len(ds))))

    # verify_cache finds exactly that key; --delete_bad + rerunning the writer recomputes it
    report_path = tmp_path / "report.json"
    assert verify_main([str(lat_dir), data["dino_dir"], "--json", str(report_path), "--no_progress"]) == 1
    report = json.loads(report_path.read_text())
    assert list(report[0]["bad_records"]) == [victim] and report[0]["records"] == 8 and report[1]["ok"]
    assert verify_cache(lat_dir, delete_bad=True, show_progress=False).deleted_records == 1
    lat_meta = {k: v for k, v in read_metadata(lat_dir).items()}
    with LMDBCacheWriter(lat_dir, lat_meta, shard_size=5) as w:
        w.put(victim, fake.latents[int(victim.split("_")[1])].half())
    assert verify_cache(lat_dir, show_progress=False).ok
    ds = SD15AlignedDataset(*args, cfg_dropout=0.0)
    torch.testing.assert_close(
        ds.get_batch(list(range(8)))["latent"],
        fake.latents[[int(ds.sample_id(i).split("_")[1]) for i in range(8)]],
    )


def test_record_of_wrong_length_is_an_error_on_read(tmp_path):
    cache = tmp_path / "c"
    _build(cache, _values(12))
    reader = LMDBCacheReader(cache)
    shard = reader.shard_paths[int(reader.locate(["id005"])[0])]
    _rewrite(shard, "id005", reader.get_value("id005")[:-100])
    with pytest.raises(
        CorruptRecordError,
        match=r"'id005' .* 16292 bytes, but metadata.json's shape \[64, 64\] x dtype float32 gives 16384 \(\+8 checksum\)",
    ):
        LMDBCacheReader(cache).get("id005")
    out = torch.empty(64, 64)
    with pytest.raises(CorruptRecordError, match="id005"):
        LMDBCacheReader(cache).read_into("id005", out)


@pytest.mark.parametrize(
    "field,edited,message",
    [
        (
            "shape",
            [32, 128],
            r"field 'shape' is \[32, 128\], but writer part000-of-001 wrote its records as \[64, 64\]",
        ),
        (
            "dtype",
            "float16",
            r"field 'dtype' is 'float16', but writer part000-of-001 wrote its records as 'float32'",
        ),
    ],
)
def test_edited_metadata_names_the_cache_and_the_field(tmp_path, field, edited, message):
    cache = tmp_path / "c"
    _build(cache, _values(12))
    meta = read_metadata(cache)
    meta[field] = edited
    (cache / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(MetadataMismatchError, match=rf"{cache / 'metadata.json'}: {message}"):
        LMDBCacheReader(cache)
    # without the writers' notes (caches from before them, or notes edited too) the records still tell
    for f in (cache / "writers").glob("*.json"):
        state = json.loads(f.read_text())
        state.pop("shape"), state.pop("dtype")
        f.write_text(json.dumps(state))
    with pytest.raises(MetadataMismatchError, match=rf"{cache / 'metadata.json'}: field '{field}'"):
        LMDBCacheReader(cache)
    report = verify_cache(cache, delete_bad=True, show_progress=False)
    assert (
        report.metadata_error and report.deleted_records == 0
    )  # nothing deleted while the metadata is wrong
    assert len(LMDBCacheReader(cache, sample_records=0, verify=False)) == 12


def test_same_size_dtype_edit_is_caught_by_the_checksum(tmp_path):
    # float16 -> bfloat16 keeps every length: only the writers' notes or the checksum can tell
    cache = tmp_path / "c"
    _build(cache, {k: v.half() for k, v in _values(4).items()}, meta={**META, "dtype": "float16"})
    meta = read_metadata(cache)
    (cache / "metadata.json").write_text(json.dumps({**meta, "dtype": "bfloat16"}))
    for f in (cache / "writers").glob("*.json"):
        f.write_text(
            json.dumps({k: v for k, v in json.loads(f.read_text()).items() if k not in ("shape", "dtype")})
        )
    with pytest.raises(
        MetadataMismatchError, match="field 'dtype' is 'bfloat16', but the records were written as 'float16'"
    ):
        LMDBCacheReader(cache)


def test_old_cache_without_checksums_is_read_with_lengths_checked(tmp_path):
    cache = tmp_path / "c"
    values = _values(12)
    _build(cache, dict(list(values.items())[:6]), checksum=None)  # format 1, as before this change
    meta = read_metadata(cache)
    assert meta["checksum"] is None and meta["format_version"] == 1
    _build(cache, values)  # resuming with the default (checksums) keeps the cache's own format: no mix
    reader = LMDBCacheReader(cache)
    assert reader.checksum is None and not reader.verify and read_metadata(cache)["format_version"] == 1
    assert all(torch.equal(reader.get(k), v) for k, v in values.items())
    report = verify_cache(cache, show_progress=False)
    assert report.ok and not report.checked_checksums and report.records == 12


def test_verify_once_is_shared_by_loader_workers_and_always_reverifies(tmp_path):
    from datasets.sd15_aligned import SD15AlignedDataset, make_batched_loader
    from tests.urepa.fake_data import write_lmdb_caches

    data = write_lmdb_caches(tmp_path / "caches", n=8)
    args = (data["csv"], data["latent_dir"], data["dino_dir"], data["clip_embeddings"])
    once = SD15AlignedDataset(*args, cfg_dropout=0.0)
    assert once.verify_checksums == "once" and not once._verified.any()
    for _ in make_batched_loader(once, 4, shuffle=False, num_workers=2, seed=None):
        pass
    assert once._verified.all()  # set by the (forked) workers, seen here and by the next epoch's workers
    reader = LMDBCacheReader(data["dino_dir"])
    victim = once.sample_id(5)
    value = bytearray(reader.get_value(victim))
    value[10] ^= 0x01  # one flipped bit
    _rewrite(reader.shard_paths[int(reader.locate([victim])[0])], victim, bytes(value))
    # "once": this run already verified the sample, its later reads are trusted (the documented trade-off)
    assert once.get_batch(list(range(8)))["latent"].shape[0] == 8
    always = SD15AlignedDataset(*args, cfg_dropout=0.0, verify_checksums="always")
    always._verified[:] = True
    assert always.get_batch(list(range(8)))["latent"].shape[0] == 7 and always.num_bad_records == 1
    fresh = SD15AlignedDataset(*args, cfg_dropout=0.0)  # a new run verifies it at its first read
    assert fresh.get_batch(list(range(8)))["latent"].shape[0] == 7
    off = SD15AlignedDataset(*args, cfg_dropout=0.0, verify_checksums="off")
    assert off.get_batch(list(range(8)))["latent"].shape[0] == 8
