"""Cache builders on the tiny assets: values vs direct encoding, one pass == two passes, sharding, resume,
unreadable images counted, CLIP embeddings."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from datasets.lmdb_cache import LMDBCacheReader, read_metadata
from datasets.sd15_aligned import SD15AlignedDataset, load_clip_embeddings
from preprocessing import build_caches, build_dino_cache, encode_vae_latents, prepare_clip_embeddings

VAE_RES, DINO_RES = 64, 56  # tiny SD: 64 px -> latent 8x8; DINO 56 px -> 4x4 = 16 tokens


def _rows(tiny_assets) -> list[dict]:
    train = Path(tiny_assets["imagenet"]) / "ILSVRC" / "Data" / "CLS-LOC" / "train"
    classes = json.loads(Path(tiny_assets["imagenet_classes"]).read_text())
    rows = []
    for cid in range(3):
        synset = classes[str(cid)][0]
        files = sorted((train / synset).glob("*.JPEG"))
        files = [f for f in files if f != Path(tiny_assets["imagenet_corrupt"])][:3]
        rows += [{"id": f.stem, "img_path": str(f), "class_id": cid, "synset": synset} for f in files]
    corrupt = Path(tiny_assets["imagenet_corrupt"])
    rows.insert(2, {"id": corrupt.stem, "img_path": str(corrupt), "class_id": 0, "synset": rows[0]["synset"]})
    return rows


def _write_csv(rows, path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "img_path", "class_id", "synset"])
        w.writeheader()
        w.writerows(rows)
    return path


def _vae_flags(tiny_assets, prefix: str = "") -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(tiny_assets["sd15"]),
        f"--{prefix}resolution",
        str(VAE_RES),
    ]


def _dino_flags(tiny_assets, prefix: str = "") -> list[str]:
    return [
        "--dinov2_weights",
        str(tiny_assets["dinov2_official"]),
        "--variant",
        "tiny14",
        f"--{prefix}resolution",
        str(DINO_RES),
    ]


COMMON = ["--batch_size", "4", "--num_workers", "0", "--no_progress", "--shard_size", "4"]


@pytest.fixture(scope="module")
def built(tiny_assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("caches")
    rows = _rows(tiny_assets)
    csv_path = _write_csv(rows, tmp / "train.csv")
    one = tmp / "one"
    # an "interrupted" first run that only got through the first 5 rows, then the full run resumes it
    first = build_caches.main(
        [
            "--csv",
            str(csv_path),
            "--limit",
            "5",
            "--latent_dir",
            str(one / "lat"),
            "--dino_dir",
            str(one / "dino"),
            *_vae_flags(tiny_assets, "vae_"),
            *_dino_flags(tiny_assets, "dino_"),
            *COMMON,
        ]
    )
    resumed = build_caches.main(
        [
            "--csv",
            str(csv_path),
            "--latent_dir",
            str(one / "lat"),
            "--dino_dir",
            str(one / "dino"),
            *_vae_flags(tiny_assets, "vae_"),
            *_dino_flags(tiny_assets, "dino_"),
            *COMMON,
        ]
    )
    two = tmp / "two"
    encode_vae_latents.main(
        ["--csv", str(csv_path), "--output_dir", str(two / "lat"), *_vae_flags(tiny_assets), *COMMON]
    )
    sharded = [
        build_dino_cache.main(
            [
                "--csv",
                str(csv_path),
                "--output_dir",
                str(two / "dino"),
                *_dino_flags(tiny_assets),
                "--num_shards",
                "2",
                "--shard_index",
                str(i),
                *COMMON,
            ]
        )
        for i in range(2)
    ]
    return {
        "rows": rows,
        "csv": csv_path,
        "one": one,
        "two": two,
        "first": first,
        "resumed": resumed,
        "sharded": sharded,
        "tmp": tmp,
    }


def _good_ids(built) -> list[str]:
    return [r["id"] for r in built["rows"] if not r["id"].endswith("99999")]


def test_latent_cache_equals_direct_vae_encoding(built, tiny_assets):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(tiny_assets["sd15"]), subfolder="vae").eval()
    reader = LMDBCacheReader(built["one"] / "lat")
    meta = reader.metadata
    assert meta["shape"] == [4, 8, 8] and meta["dtype"] == "float16" and meta["scaled"] is True
    assert meta["scaling_factor"] == pytest.approx(0.18215) and meta["content"] == "mean"
    ids = _good_ids(built)[:4]
    paths = {r["id"]: r["img_path"] for r in built["rows"]}
    images = []
    for sid in ids:
        img = Image.open(paths[sid]).convert("RGB")
        w, h = img.size
        s = VAE_RES / min(w, h)
        img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
        left, top = (img.size[0] - VAE_RES) // 2, (img.size[1] - VAE_RES) // 2
        img = img.crop((left, top, left + VAE_RES, top + VAE_RES))
        images.append(
            torch.from_numpy(__import__("numpy").asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1
        )
    with torch.no_grad():
        want = vae.encode(torch.stack(images)).latent_dist.mean * vae.config.scaling_factor
    got = torch.stack([reader.get(i) for i in ids])
    assert got.dtype == torch.float16 and got.shape == (4, 4, 8, 8)
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


def test_dino_cache_equals_direct_adapter_with_official_transform(built, tiny_assets):
    from models.dinov2_encoder import DINOv2Encoder

    enc = DINOv2Encoder.from_pretrained(
        tiny_assets["dinov2_official"], variant="tiny14", resolution=DINO_RES, input_range="0_1"
    )
    official = transforms.Compose(
        [
            transforms.Resize(64, interpolation=3),  # round(56 * 256 / 224) = 64
            transforms.CenterCrop(DINO_RES),
            transforms.ToTensor(),
            transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ]
    )
    reader = LMDBCacheReader(built["one"] / "dino")
    meta = reader.metadata
    assert meta["grid"] == [4, 4] and meta["num_tokens"] == 16 and meta["D"] == 64 and meta["patch"] == 14
    assert meta["resolution"] == DINO_RES and meta["resize"] == 64 and meta["normalized"] is True
    ids = _good_ids(built)[:4]
    paths = {r["id"]: r["img_path"] for r in built["rows"]}
    x = torch.stack([official(Image.open(paths[i]).convert("RGB")) for i in ids])
    with torch.no_grad():
        want = F.normalize(enc(x, preprocess=False).patch_tokens, dim=-1)
    got = torch.stack([reader.get(i) for i in ids])
    assert got.dtype == torch.float16 and got.shape == (4, 16, 64)
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got.float().norm(dim=-1), torch.ones(4, 16), atol=2e-3, rtol=0)


def test_one_pass_equals_two_passes(built):
    for name in ("lat", "dino"):
        a, b = LMDBCacheReader(built["one"] / name), LMDBCacheReader(built["two"] / name)
        assert sorted(a.keys()) == sorted(b.keys()) == sorted(_good_ids(built))
        meta_a, meta_b = a.metadata, b.metadata
        for k in ("shape", "dtype", "encoder", "resolution", "count", "num_corrupt"):
            assert meta_a[k] == meta_b[k], k
        for key in a.keys():
            torch.testing.assert_close(a.get(key), b.get(key), atol=1e-3, rtol=1e-3)


def test_two_shards_cover_every_id_once(built):
    reader = LMDBCacheReader(built["two"] / "dino")  # raises if an id were stored twice
    meta = reader.metadata
    assert set(meta["writers"]) == {"part000-of-002", "part001-of-002"}
    per_writer = []
    for shard in reader.shard_paths:
        sub = [k for k in reader.keys() if int(reader.locate([k])[0]) == reader.shard_paths.index(shard)]
        per_writer.append((shard.name.rsplit("-", 1)[0], set(sub)))
    part0 = set().union(*(s for w, s in per_writer if w.startswith("part000")))
    part1 = set().union(*(s for w, s in per_writer if w.startswith("part001")))
    assert part0 and part1 and not part0 & part1
    assert part0 | part1 == set(_good_ids(built))
    written = [s[0].written for s in built["sharded"]]
    assert sum(written) == len(_good_ids(built)) and all(w > 0 for w in written)


def test_resume_does_not_redo_finished_ids(built, tiny_assets):
    first, resumed = built["first"], built["resumed"]
    done_first = first[0].written  # 4 good ids among the first 5 rows (row 3 is the corrupt JPEG)
    assert done_first == 4 and first[0].corrupt == 1
    for s in resumed:
        assert s.already_cached == done_first
        assert s.written == len(_good_ids(built)) - done_first
    # a third run has nothing left to do (the unreadable image is retried, and fails again)
    again = build_caches.main(
        [
            "--csv",
            str(built["csv"]),
            "--dino_dir",
            str(built["one"] / "dino"),
            *_dino_flags(tiny_assets, "dino_"),
            *COMMON,
        ]
    )
    assert (
        again[0].written == 0 and again[0].already_cached == len(_good_ids(built)) and again[0].corrupt == 1
    )


def test_unreadable_image_is_counted_and_reported_not_silent(built, capsys):
    corrupt_id = built["rows"][2]["id"]
    for cache in ("one", "two"):
        for name in ("lat", "dino"):
            meta = read_metadata(built[cache] / name)
            assert meta["num_corrupt"] == 1, (cache, name)
            assert list(meta["corrupt"]) == [corrupt_id] and "cannot decode" in meta["corrupt"][corrupt_id]
            assert meta["count"] == len(_good_ids(built))
    # the resumed run retried it (and counted it again); the summary line says so
    assert all(s.corrupt == 1 for s in built["resumed"])
    # the dataset drops it with a warning instead of failing on a "missing" id
    clip = built["tmp"] / "clip.pt"
    torch.save({"embeddings": torch.zeros(4, 77, 32), "null_index": 3}, clip)
    ds = SD15AlignedDataset(built["csv"], built["one"] / "lat", built["one"] / "dino", clip)
    assert len(ds) == len(_good_ids(built))
    with pytest.raises(ValueError, match=r"1 of 10 ids .* missing in the latent cache"):
        SD15AlignedDataset(
            built["csv"], built["one"] / "lat", built["one"] / "dino", clip, drop_unreadable=False
        )


def test_dataset_on_built_caches(built):
    clip = built["tmp"] / "clip2.pt"
    torch.save({"embeddings": torch.randn(4, 77, 32).half(), "null_index": 3}, clip)
    ds = SD15AlignedDataset(
        built["csv"],
        built["one"] / "lat",
        built["one"] / "dino",
        clip,
        cfg_dropout=0.0,
        expected={
            "D": 64,
            "num_tokens": 16,
            "dtype": "float16",
            "encoder": "dinov2_tiny14",
            "latent_shape": [4, 8, 8],
            "clip_dim": 32,
        },
    )
    item = ds[0]
    assert item["latent"].shape == (4, 8, 8) and item["latent"].dtype == torch.float32
    assert item["dino_tokens"]["mid"].shape == (16, 64)
    torch.testing.assert_close(
        item["latent"], LMDBCacheReader(built["one"] / "lat").get(ds.sample_id(0)).float()
    )


def test_missing_weights_are_a_clear_error(built, tmp_path):
    from utils.weights import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="VAE"):
        encode_vae_latents.main(
            [
                "--csv",
                str(built["csv"]),
                "--output_dir",
                str(tmp_path / "x"),
                "--pretrained_model_name_or_path",
                str(tmp_path / "no_sd"),
                *COMMON,
            ]
        )
    with pytest.raises(MissingWeightsError, match="no_dino.pth"):
        build_dino_cache.main(
            [
                "--csv",
                str(built["csv"]),
                "--output_dir",
                str(tmp_path / "y"),
                "--dinov2_weights",
                str(tmp_path / "no_dino.pth"),
                "--variant",
                "tiny14",
                *COMMON,
            ]
        )


def test_clip_embeddings_shape_and_null_prompt_last(tiny_assets, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    out = prepare_clip_embeddings.main(
        [
            "--pretrained_model_name_or_path",
            str(tiny_assets["sd15"]),
            "--class_index_json",
            str(tiny_assets["imagenet_classes"]),
            "--out",
            str(tmp_path / "clip.safetensors"),
        ]
    )
    emb, info = load_clip_embeddings(out)
    k = len(json.loads(Path(tiny_assets["imagenet_classes"]).read_text()))
    assert emb.shape == (k + 1, 77, 32) and emb.dtype == torch.float16
    assert (
        info["null_index"] == k and info["prompts"][-1] == "" and info["prompts"][0] == "a photo of a tench"
    )
    assert info["prompts"][2] == "a photo of a great white shark"
    tok = CLIPTokenizer.from_pretrained(str(tiny_assets["sd15"]), subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(str(tiny_assets["sd15"]), subfolder="text_encoder").eval()
    with torch.no_grad():
        ids = tok(
            ["", "a photo of a tench"], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        want = te(ids).last_hidden_state
    torch.testing.assert_close(emb[-1].float(), want[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(emb[0].float(), want[1], atol=2e-3, rtol=2e-3)


def test_decompression_bomb_and_16bit_png_in_a_cache_job(tiny_assets, tmp_path):
    """A header claiming 20000x20000 is skipped, counted and listed (the job and its rerun finish; what was
    written stays); a 16-bit PNG is cached from its scaled pixels, not as a white image."""
    import numpy as np

    from tests.bad_inputs import write_bomb_png, write_png

    good = _rows(tiny_assets)[:2]
    ramp = (np.arange(DINO_RES * DINO_RES * 3, dtype=np.uint32) * 37 % 65536).astype(np.uint16)
    png16 = write_png(tmp_path / "deep.png", ramp.reshape(DINO_RES, DINO_RES, 3)[..., 0])
    rows = [
        *good,
        {"id": "bomb", "img_path": str(write_bomb_png(tmp_path / "bomb.png")), "class_id": 0, "synset": "n0"},
        {"id": "deep", "img_path": str(png16), "class_id": 0, "synset": "n0"},
    ]
    csv_path = _write_csv(rows, tmp_path / "bad.csv")
    argv = [
        "--csv",
        str(csv_path),
        "--output_dir",
        str(tmp_path / "dino"),
        *_dino_flags(tiny_assets),
        *COMMON,
    ]
    first = build_dino_cache.main(argv)
    assert first[0].written == 3 and first[0].corrupt == 1
    meta = read_metadata(tmp_path / "dino")
    assert meta["count"] == 3 and list(meta["corrupt"]) == ["bomb"]
    assert (
        "bomb.png: too many pixels" in meta["corrupt"]["bomb"]
        and "--max_image_pixels" in meta["corrupt"]["bomb"]
    )
    before = {k: LMDBCacheReader(tmp_path / "dino").get(k) for k in ("deep", good[0]["id"])}
    again = build_dino_cache.main(argv)  # the rerun retries the bomb, keeps everything else
    assert again[0].written == 0 and again[0].already_cached == 3 and again[0].corrupt == 1
    reader = LMDBCacheReader(tmp_path / "dino")
    assert all(torch.equal(reader.get(k), v) for k, v in before.items())
    # the 16-bit image was encoded from v >> 8 (a white image would give other tokens)
    from models.dinov2_encoder import DINOv2Encoder
    from preprocessing.cache_jobs import dino_transform

    enc = DINOv2Encoder.from_pretrained(
        str(tiny_assets["dinov2_official"]), variant="tiny14", resolution=DINO_RES, input_range="0_1"
    ).eval()
    image = Image.fromarray((ramp.reshape(DINO_RES, DINO_RES, 3)[..., 0] >> 8).astype("uint8")).convert("RGB")
    with torch.no_grad():
        want = F.normalize(enc(dino_transform(DINO_RES)(image)[None]).patch_tokens.float(), dim=-1)[0]
    torch.testing.assert_close(reader.get("deep").float(), want, atol=2e-3, rtol=0)
    # a limit below every image: all are listed as unreadable, nothing is lost from the cache
    small = build_dino_cache.main([*argv, "--max_image_pixels", "10"])
    assert small[0].written == 0 and small[0].already_cached == 3
    assert read_metadata(tmp_path / "dino")["count"] == 3


class _BatchSensitiveEncoder:
    """A stand-in encoder whose records depend on the batch they were encoded in (as batched conv kernels'
    rounding can): record = image mean + 1e-3 * batch mean. ``stop_after`` raises KeyboardInterrupt then."""

    name = "batch_sensitive"
    metadata = {"encoder": "batch_sensitive", "shape": [1], "dtype": "float32"}

    def __init__(self, stop_after: int | None = None):
        self.calls, self.stop_after = 0, stop_after

    @staticmethod
    def transform(image):
        return torch.tensor([float(sum(image.getpixel((0, 0))))])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if self.stop_after is not None and self.calls == self.stop_after:
            raise KeyboardInterrupt
        self.calls += 1
        return images + 1e-3 * images.mean()


def test_interrupted_and_resumed_build_writes_the_same_bytes(tmp_path):
    """Issue 21 R8: a resumed build batched only the missing images -- including the unreadable ones, which are
    retried -- so the batches after an unreadable image shifted and their records were encoded with other
    neighbours than in an uninterrupted build. Batches are now fixed slices of the rows."""
    from datasets.lmdb_cache import LMDBCacheWriter
    from datasets.sample_csv import SampleRow
    from preprocessing.cache_jobs import run_cache_job

    rows = []
    for i in range(10):
        Image.new("RGB", (16, 16), (i * 20, 3 * i, 7)).save(tmp_path / f"{i}.png")
        rows.append(SampleRow(f"id{i}", f"{i}.png", 0, "n0"))
    (tmp_path / "1.png").write_bytes(b"not an image")  # unreadable: retried on every run

    def build(cache: Path, stop_after: int | None) -> None:
        enc = _BatchSensitiveEncoder(stop_after)
        writer = LMDBCacheWriter(cache, enc.metadata, shard_size=100)
        try:
            run_cache_job(rows, [(enc, writer)], tmp_path, batch_size=4, num_workers=0, show_progress=False)
        except KeyboardInterrupt:
            writer.close()

    build(tmp_path / "straight", None)
    build(tmp_path / "resumed", 1)  # interrupted after the first batch (4 records committed)
    assert len(LMDBCacheReader(tmp_path / "resumed")) == 3
    build(tmp_path / "resumed", None)
    a, b = LMDBCacheReader(tmp_path / "straight"), LMDBCacheReader(tmp_path / "resumed")
    assert sorted(a.keys()) == sorted(b.keys()) and len(a) == 9
    for key in a.keys():
        assert a.get(key).numpy().tobytes() == b.get(key).numpy().tobytes(), key


def test_image_below_the_minimum_size_is_skipped_and_named(tmp_path):
    """Issue 21 R13: a 1x1 image was upscaled to a flat image and cached; now refused with its path."""
    from datasets.lmdb_cache import LMDBCacheWriter
    from datasets.sample_csv import SampleRow
    from preprocessing.cache_jobs import run_cache_job

    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "ok.png")
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "dot.png")
    rows = [SampleRow("ok", "ok.png", 0, "n0"), SampleRow("dot", "dot.png", 0, "n0")]
    enc = _BatchSensitiveEncoder()
    with LMDBCacheWriter(tmp_path / "c", enc.metadata, shard_size=100) as writer:
        stats = run_cache_job(
            rows, [(enc, writer)], tmp_path, batch_size=2, num_workers=0, show_progress=False
        )
    assert stats[0].written == 1 and stats[0].corrupt == 1
    reason = read_metadata(tmp_path / "c")["corrupt"]["dot"]
    assert "dot.png" in reason and "too small: 1x1" in reason and "--min_image_size 16" in reason
    with LMDBCacheWriter(tmp_path / "c2", enc.metadata, shard_size=100) as writer:  # the flag accepts it
        stats = run_cache_job(
            rows, [(enc, writer)], tmp_path, batch_size=2, num_workers=0, show_progress=False, min_size=1
        )
    assert stats[0].written == 2
