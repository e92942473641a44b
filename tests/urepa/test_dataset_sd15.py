"""SD15AlignedDataset on synthetic caches: outputs, start-up validation errors, CFG dropout, posterior sampling."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from datasets.lmdb_cache import LMDBCacheWriter
from datasets.sd15_aligned import CacheValidationError, SD15AlignedDataset, uniform01

N, D, C, S = 24, 8, 4, 4  # tokens, token dim, latent channels, latent side


def _latent_meta(moments=False, **over):
    meta = {
        "kind": "vae_latent",
        "encoder": "AutoencoderKL",
        "latent_shape": [C, S, S],
        "shape": [2, C, S, S] if moments else [C, S, S],
        "content": "mean_std" if moments else "mean",
        "scaled": True,
        "scaling_factor": 0.18215,
        "dtype": "float16",
        "resolution": 32,
    }
    meta.update(over)
    return meta


def _dino_meta(**over):
    meta = {
        "kind": "dino_tokens",
        "encoder": "dinov2_vitl14",
        "D": D,
        "num_tokens": N,
        "grid": [4, 6],
        "shape": [N, D],
        "dtype": "float16",
        "normalized": True,
        "resolution": 56,
        "patch": 14,
    }
    meta.update(over)
    return meta


def make_caches(root: Path, n: int = 40, moments: bool = False, dino_meta=None, skip_dino=(), corrupt=()):
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"img{i:04d}" for i in range(n)]
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "img_path", "class_id", "synset"])
        for i, sid in enumerate(ids):
            w.writerow([sid, f"/x/{sid}.JPEG", i % 3, f"n{i % 3}"])
    dm = dino_meta or _dino_meta()
    with (
        LMDBCacheWriter(root / "lat", _latent_meta(moments), shard_size=16) as lw,
        LMDBCacheWriter(root / "dino", dm, shard_size=16) as dw,
    ):
        for i, sid in enumerate(ids):
            if sid in corrupt:
                lw.mark_corrupt(sid, "cannot decode image")
                dw.mark_corrupt(sid, "cannot decode image")
                continue
            mean = torch.full((C, S, S), float(i))
            lw.put(sid, torch.stack([mean, torch.full((C, S, S), 0.5)]).half() if moments else mean.half())
            if sid not in skip_dino:
                dw.put(sid, torch.nn.functional.normalize(torch.randn(*dm["shape"]), dim=-1).half())
    emb = torch.arange(4, dtype=torch.float32).view(4, 1, 1).expand(4, 77, 16).contiguous().half()
    torch.save({"embeddings": emb, "null_index": 3}, root / "clip.pt")
    return root


def _ds(root, **kw):
    return SD15AlignedDataset(root / "train.csv", root / "lat", root / "dino", root / "clip.pt", **kw)


def test_items_have_the_documented_shapes_and_dtypes(tmp_path):
    root = make_caches(tmp_path)
    ds = _ds(
        root,
        cfg_dropout=0.0,
        layers=("mid", "enc_last"),
        expected={"D": D, "num_tokens": N, "dtype": "float16", "encoder": "dinov2_vitl14", "clip_dim": 16},
    )
    assert len(ds) == 40
    item = ds[5]
    assert item["latent"].shape == (C, S, S) and item["latent"].dtype == torch.float32
    assert torch.all(item["latent"] == 5.0)
    assert set(item["dino_tokens"]) == {"mid", "enc_last"}
    assert item["dino_tokens"]["mid"].shape == (N, D) and item["dino_tokens"]["mid"].dtype == torch.float16
    assert item["dino_tokens"]["mid"] is item["dino_tokens"]["enc_last"]
    assert (
        item["encoder_hidden_states"].shape == (77, 16)
        and item["encoder_hidden_states"].dtype == torch.float32
    )
    assert item["class_id"] == 2 and torch.all(item["encoder_hidden_states"] == 2.0)
    batch = next(iter(DataLoader(ds, batch_size=8, num_workers=2)))  # lazily opened envs in forked workers
    assert batch["latent"].shape == (8, C, S, S) and batch["dino_tokens"]["mid"].shape == (8, N, D)
    assert batch["encoder_hidden_states"].shape == (8, 77, 16) and batch["class_id"].tolist() == [
        0,
        1,
        2,
    ] * 2 + [0, 1]
    assert torch.equal(batch["latent"][:, 0, 0, 0], torch.arange(8.0))


@pytest.mark.parametrize(
    "expected, pattern",
    [
        ({"D": 1024}, r"dino[/\\]metadata.json: D = 8, but the model expects D = 1024"),
        (
            {"num_tokens": 256},
            r"dino[/\\]metadata.json: num_tokens = 24, but the model expects num_tokens = 256",
        ),
        ({"dtype": "bfloat16"}, r"dtype = 'float16', but the model expects dtype = 'bfloat16'"),
        (
            {"encoder": "dinov2_vitb14"},
            r"encoder = 'dinov2_vitl14', but the model expects encoder = 'dinov2_vitb14'",
        ),
        ({"latent_shape": [4, 64, 64]}, r"lat[/\\]metadata.json: latent_shape = \[4, 4, 4\]"),
        ({"clip_dim": 768}, r"clip.pt: dim = 16, but the model expects clip_dim = 768"),
    ],
)
def test_metadata_mismatch_names_file_and_values(tmp_path, expected, pattern):
    root = make_caches(tmp_path, n=4)
    with pytest.raises(CacheValidationError, match=pattern):
        _ds(root, expected=expected)


def test_unknown_expectation_key_is_an_error(tmp_path):
    root = make_caches(tmp_path, n=4)
    with pytest.raises(ValueError, match=r"unknown expectation keys \['Dim'\]"):
        _ds(root, expected={"Dim": 8})


def test_missing_ids_are_listed_with_their_count(tmp_path):
    missing = [f"img{i:04d}" for i in (3, 7, 8, 20, 21, 30, 31)]
    root = make_caches(tmp_path, skip_dino=missing)
    with pytest.raises(CacheValidationError) as err:
        _ds(root)
    msg = str(err.value)
    assert "7 of 40 ids" in msg and "train.csv" in msg and "DINO cache" in msg and str(root / "dino") in msg
    assert "img0003" in msg and "img0021" in msg and "img0030" not in msg  # the first five only


def test_swapped_caches_are_detected(tmp_path):
    root = make_caches(tmp_path, n=4)
    with pytest.raises(CacheValidationError, match="kind = 'dino_tokens', expected 'vae_latent'"):
        SD15AlignedDataset(root / "train.csv", root / "dino", root / "lat", root / "clip.pt")


def test_class_id_outside_embedding_table(tmp_path):
    root = make_caches(tmp_path, n=4)
    torch.save({"embeddings": torch.zeros(3, 77, 16), "null_index": 2}, root / "clip.pt")  # 2 classes + null
    with pytest.raises(CacheValidationError, match=r"1 rows have class_id outside 0..1 .*\['img0002'\]"):
        _ds(root)


def test_unreadable_ids_are_dropped_with_a_warning(tmp_path):
    root = make_caches(tmp_path, n=10, corrupt=("img0004",))
    ds = _ds(root)
    assert len(ds) == 9 and "img0004" not in [ds.sample_id(i) for i in range(len(ds))]


def test_cfg_dropout_rate_and_determinism(tmp_path):
    root = make_caches(tmp_path, n=4)
    ds = _ds(root, cfg_dropout=0.1, seed=3)
    # the draw itself over many (epoch, index) pairs: rate within 4 sigma of 0.1
    draws = [uniform01(3, e, i, 1) < 0.1 for e in range(20) for i in range(1000)]
    rate = sum(draws) / len(draws)
    assert abs(rate - 0.1) < 4 * (0.1 * 0.9 / len(draws)) ** 0.5
    # through the dataset: dropped items carry the null embedding (the last row, value 3 here)
    seen = {True: 0, False: 0}
    for epoch in range(60):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            dropped = ds.is_dropped(i)
            seen[dropped] += 1
            want = 3.0 if dropped else float(item["class_id"])
            assert torch.all(item["encoder_hidden_states"] == want)
    assert 0.03 < seen[True] / 240 < 0.2
    ds.set_epoch(7)
    a = [ds.is_dropped(i) for i in range(4)]
    ds.set_epoch(7)
    assert a == [ds.is_dropped(i) for i in range(4)]
    assert all(not _ds(root, cfg_dropout=0.0).is_dropped(i) for i in range(4))
    assert all(_ds(root, cfg_dropout=1.0).is_dropped(i) for i in range(4))


def test_moments_cache_samples_the_posterior(tmp_path):
    root = make_caches(tmp_path, n=6, moments=True)
    ds = _ds(root)
    x = ds[2]["latent"]
    assert x.shape == (C, S, S)
    eps = (x - 2.0) / 0.5  # mean 2, std 0.5
    assert 0.3 < eps.std().item() < 2.0 and not torch.allclose(x, torch.full_like(x, 2.0))
    assert torch.equal(ds[2]["latent"], x)  # same (seed, epoch, index) -> same draw
    ds.set_epoch(1)
    assert not torch.equal(ds[2]["latent"], x)
    assert torch.all(_ds(root, sample_posterior=False)[2]["latent"] == 2.0)


def test_clip_file_with_null_not_last_is_rejected(tmp_path):
    root = make_caches(tmp_path, n=4)
    torch.save({"embeddings": torch.zeros(4, 77, 16), "null_index": 0}, root / "clip.pt")
    with pytest.raises(ValueError, match="null prompt must be the last row"):
        _ds(root)


def test_bad_arguments(tmp_path):
    root = make_caches(tmp_path, n=4)
    with pytest.raises(ValueError, match="cfg_dropout"):
        _ds(root, cfg_dropout=1.5)
    with pytest.raises(FileNotFoundError, match="CLIP embeddings file not found"):
        SD15AlignedDataset(root / "train.csv", root / "lat", root / "dino", root / "nope.pt")
    json.loads((root / "lat" / "metadata.json").read_text())


def test_batched_loader_equals_default_collate(tmp_path):
    from torch.utils.data import default_collate

    from datasets.sd15_aligned import make_batched_loader

    root = make_caches(tmp_path, n=20, moments=True)
    ds = _ds(root, cfg_dropout=0.3, layers=("mid", "dec_first"))
    want = default_collate([ds[i] for i in [4, 0, 17]])
    got = ds[[4, 0, 17]]
    assert set(got) == set(want) and set(got["dino_tokens"]) == {"mid", "dec_first"}
    for key in ("latent", "encoder_hidden_states", "class_id"):
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert torch.equal(got["dino_tokens"]["mid"], want["dino_tokens"]["mid"])
    batches = list(make_batched_loader(ds, batch_size=8, shuffle=False, drop_last=False, num_workers=2))
    assert [b["latent"].shape[0] for b in batches] == [8, 8, 4]
    seq = default_collate([ds[i] for i in range(8, 16)])
    assert torch.equal(batches[1]["latent"], seq["latent"]) and torch.equal(
        batches[1]["class_id"], seq["class_id"]
    )
    shuffled = [b["class_id"] for b in make_batched_loader(ds, batch_size=8, num_workers=0, seed=1)]
    assert len(shuffled) == 2  # drop_last
    # Same sampler as the default-collate loader: the same seed gives the same shuffled batches.
    from torch.utils.data import DataLoader

    plain = DataLoader(
        ds, batch_size=8, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(1)
    )
    assert [torch.equal(a, b["class_id"]) for a, b in zip(shuffled, plain)] == [True, True]
    assert not torch.equal(torch.cat(shuffled), torch.arange(16))


@pytest.mark.parametrize("moments,posterior", [(False, False), (True, False), (True, True)])
def test_compact_batches_hold_the_same_data(tmp_path, moments, posterior):
    from datasets.sd15_aligned import make_batched_loader

    root = make_caches(tmp_path, n=20, moments=moments)
    ds = _ds(root, cfg_dropout=0.5, sample_posterior=posterior)
    full, compact = ds.get_batch([3, 19, 7, 0]), ds.get_batch([3, 19, 7, 0], compact=True)
    assert set(compact) == {"latent", "dino_tokens", "prompt_index", "class_id"}
    assert compact["latent"].dtype == (torch.float32 if posterior else torch.float16)
    assert torch.equal(compact["latent"].float(), full["latent"])
    assert torch.equal(ds.embeddings[compact["prompt_index"]].float(), full["encoder_hidden_states"])
    assert 3 in compact["prompt_index"].tolist()  # some samples dropped to the null row (index 3) at p=0.5
    assert torch.equal(compact["dino_tokens"]["mid"], full["dino_tokens"]["mid"])
    batches = list(make_batched_loader(ds, 8, shuffle=False, num_workers=2, compact=True))
    assert [b["prompt_index"].shape[0] for b in batches] == [8, 8]
    assert torch.equal(batches[1]["latent"].float(), ds.get_batch(range(8, 16))["latent"])
