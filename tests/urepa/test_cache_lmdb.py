"""LMDB tensor cache: round trips, sharding, resume after an interruption, metadata checks."""

from __future__ import annotations

import json
import multiprocessing
import pickle

import pytest
import torch

from datasets.lmdb_cache import LMDBCacheReader, LMDBCacheWriter, estimate_cache_bytes, read_metadata


def _read_first(args) -> float:
    reader, key = args
    return reader.get(key)[0, 0].item()


def _write_part(path, ids, index, count) -> None:
    with LMDBCacheWriter(path, _meta(), shard_size=4, writer_id=f"part{index:03d}-of-{count:03d}") as w:
        for i, k in enumerate(ids):
            if i % count == index:
                w.put(k, torch.full((3, 4), float(i), dtype=torch.float16))
                w.commit()
        if index == 0:
            w.mark_corrupt("bad0", "unreadable")


def _meta(dtype: str = "float16", shape=(3, 4)) -> dict:
    return {"encoder": "test", "shape": list(shape), "dtype": dtype, "normalized": False}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_preserves_dtype_and_values(tmp_path, dtype):
    torch_dtype = getattr(torch, dtype)
    data = {f"id{i:03d}": torch.randn(3, 4).to(torch_dtype) for i in range(25)}
    with LMDBCacheWriter(tmp_path / "c", _meta(dtype), shard_size=10, commit_every=4) as w:
        for k, v in data.items():
            w.put(k, v)
    r = LMDBCacheReader(tmp_path / "c")
    assert len(r) == 25 and sorted(r.keys()) == sorted(data)
    assert len(r.shard_paths) == 3  # 10 + 10 + 5
    for k, v in data.items():
        got = r.get(k)
        assert got.dtype == torch_dtype and got.shape == (3, 4)
        assert torch.equal(got, v)
    assert "id000" in r and "nope" not in r
    with pytest.raises(KeyError, match="nope"):
        r.get("nope")
    meta = r.metadata
    assert meta["count"] == 25 and meta["num_corrupt"] == 0 and meta["encoder"] == "test"
    assert meta["dtype"] == dtype and meta["shape"] == [3, 4] and meta["shard_size"] == 10


def test_reader_survives_pickle_and_reopens_lazily(tmp_path):
    with LMDBCacheWriter(tmp_path / "c", _meta(), shard_size=4) as w:
        for i in range(6):
            w.put(str(i), torch.full((3, 4), float(i), dtype=torch.float16))
    r = LMDBCacheReader(tmp_path / "c")
    assert r.get("5")[0, 0].item() == 5.0  # opens an env in this process
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.get("1")[0, 0].item() == 1.0
    r3 = LMDBCacheReader(tmp_path / "c")  # a second reader of the same cache in one process
    assert r3.get("2")[0, 0].item() == 2.0
    # a forked worker inherits the parent's open handles; it must reopen its own
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.map(_read_first, [(r, "3"), (r, "4")]) == [3.0, 4.0]
    assert list(r.locate(["0", "5", "missing"]) >= 0) == [True, True, False]


def test_writer_rejects_wrong_shape_dtype_and_duplicates(tmp_path):
    w = LMDBCacheWriter(tmp_path / "c", _meta(), shard_size=4)
    with pytest.raises(ValueError, match=r"shape \(3, 5\).*stores shape \(3, 4\)"):
        w.put("a", torch.zeros(3, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match="dtype torch.float32"):
        w.put("a", torch.zeros(3, 4))
    w.put("a", torch.zeros(3, 4, dtype=torch.float16))
    with pytest.raises(KeyError, match="already in the cache"):
        w.put("a", torch.zeros(3, 4, dtype=torch.float16))
    w.close()


def test_resume_skips_finished_keys_after_interruption(tmp_path):
    keys = [f"k{i}" for i in range(20)]
    path = tmp_path / "c"
    w = LMDBCacheWriter(path, _meta(), shard_size=6, commit_every=1000)
    for k in keys[:8]:
        w.put(k, torch.full((3, 4), float(keys.index(k)), dtype=torch.float16))
    w.mark_corrupt("k9", "cannot decode")
    w.commit()  # committed: k0..k7 and the corrupt record
    w.put(keys[8], torch.zeros(3, 4, dtype=torch.float16))  # pending, lost in the "crash"
    w._env.close()  # simulated kill: the process dies, no commit, no close(), metadata not merged
    del w

    w = LMDBCacheWriter(path, _meta(), shard_size=6)
    assert w.num_existing == 8
    assert all(w.has(k) for k in keys[:8]) and not w.has("k8")
    redone = []
    for k in keys:
        if not w.has(k):
            redone.append(k)
            if k == "k9":
                w.mark_corrupt(k, "still broken")
                continue
            w.put(k, torch.full((3, 4), float(keys.index(k)), dtype=torch.float16))
    meta = w.close()
    assert redone == keys[8:]  # nothing finished was redone
    r = LMDBCacheReader(path)
    assert len(r) == 19 and meta["count"] == 19
    assert meta["num_corrupt"] == 1 and meta["corrupt"] == {"k9": "still broken"}
    assert all(r.get(k)[0, 0].item() == float(i) for i, k in enumerate(keys) if k != "k9")
    # shards: the resumed writer appended to its last non-full shard (6 + 6 + 6 + 1)
    assert [len(list(LMDBCacheReader(path).keys()))] == [19]
    assert meta["shards"] == [f"part000-of-001-{i:05d}" for i in range(4)]


def test_corrupt_id_that_later_succeeds_is_no_longer_reported(tmp_path):
    with LMDBCacheWriter(tmp_path / "c", _meta(), writer_id="a") as w:
        w.mark_corrupt("x", "truncated")
    assert read_metadata(tmp_path / "c")["num_corrupt"] == 1
    with LMDBCacheWriter(tmp_path / "c", _meta(), writer_id="b") as w:
        w.put("x", torch.zeros(3, 4, dtype=torch.float16))
    meta = read_metadata(tmp_path / "c")
    assert meta["num_corrupt"] == 0 and meta["count"] == 1


def test_parallel_writers_merge_into_one_cache(tmp_path):
    path = tmp_path / "c"
    ids = [f"s{i}" for i in range(30)]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_part, args=(path, ids, j, 2)) for j in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    meta = read_metadata(path)
    assert meta["count"] == 30 and meta["num_corrupt"] == 1
    assert set(meta["writers"]) == {"part000-of-002", "part001-of-002"}
    assert all(v["finished"] for v in meta["writers"].values())
    r = LMDBCacheReader(path)
    assert sorted(r.keys()) == sorted(ids)
    assert r.get("s7")[0, 0].item() == 7.0


def test_resume_with_different_settings_is_an_error(tmp_path):
    LMDBCacheWriter(tmp_path / "c", _meta(), shard_size=4).close()
    other = dict(_meta(), encoder="other")
    with pytest.raises(ValueError, match=r"encoder: cache has 'test', this run has 'other'"):
        LMDBCacheWriter(tmp_path / "c", other)
    with pytest.raises(ValueError, match=r"dtype: cache has 'float16', this run has 'bfloat16'"):
        LMDBCacheWriter(tmp_path / "c", _meta("bfloat16"))


def test_reader_on_missing_cache_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        LMDBCacheReader(tmp_path / "nothing")


def test_size_estimates_match_the_corrected_figures():
    # [256, 1024] fp16 = 512 KiB per record, [4, 64, 64] fp16 = 32 KiB (LMDB page rounding adds < 1 page)
    tok = estimate_cache_bytes(1, (256, 1024), "float16")
    lat = estimate_cache_bytes(1, (4, 64, 64), "float16")
    assert 512 * 1024 <= tok < 512 * 1024 + 4096 + 128
    assert 32 * 1024 <= lat < 32 * 1024 + 4096 + 128


def test_metadata_file_is_valid_json_after_each_close(tmp_path):
    with LMDBCacheWriter(tmp_path / "c", _meta()) as w:
        w.put("a", torch.zeros(3, 4, dtype=torch.float16))
    json.loads((tmp_path / "c" / "metadata.json").read_text())
