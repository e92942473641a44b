"""preprocessing/extract_dinovq_codes.py: codes in the LMDB cache format, sharded, resumable, round trip."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.dinovq_codes import DinoVQCodeDataset, DinoVQCodes
from models.dinovq import DinoVQModel
from preprocessing.extract_dinovq_codes import main as extract_main
from train.dinovq.data import resize_crop
from utils.images import pil_to_tensor

_spec = importlib.util.spec_from_file_location("dinovq_test_helpers", Path(__file__).parent / "helpers.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor")
N_IMAGES = 7


def export_tokenizer(path: Path, seed: int) -> Path:
    model = helpers.tiny_model(seed=seed)
    model.compute_loss(*helpers.batch(seed))  # a trained codebook state
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("codes")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        h, w = (30 + 3 * i, 41 - i)  # non-square, different sizes: the crop matters
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(root / f"img{i}.png")
        rows.append(
            {"id": f"img{i}", "img_path": f"img{i}.png", "class_id": i % 3, "synset": f"n{i % 3:08d}"}
        )
    (root / "broken.png").write_bytes(b"not an image")
    rows.append({"id": "broken", "img_path": "broken.png", "class_id": 0, "synset": "n00000000"})
    with open(root / "samples.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "img_path", "class_id", "synset"])
        writer.writeheader()
        writer.writerows(rows)
    return {
        "root": root,
        "csv": root / "samples.csv",
        "tok": export_tokenizer(root / "tok", 0),
        "tok_other": export_tokenizer(root / "tok_other", 1),
    }


def extract(assets, out, *extra, tokenizer="tok"):
    argv = ["--tokenizer", str(assets[tokenizer]), "--csv", str(assets["csv"]), "--output", str(out)]
    return extract_main([*argv, "--batch_size", "3", "--num_workers", "0", "--no_progress", *extra])


def image_tensor(assets, i, size=(28, 28)):
    img = Image.open(assets["root"] / f"img{i}.png").convert("RGB")
    return pil_to_tensor(resize_crop(img, size, None, flip=False), (-1.0, 1.0))[None]


def test_two_shards_flip_and_round_trip(assets, tmp_path):
    out = tmp_path / "codes"
    extract(assets, out, "--flip", "--num_shards", "2", "--shard_index", "1")
    extract(assets, out, "--flip", "--num_shards", "2", "--shard_index", "0")
    codes = DinoVQCodes(out)
    assert sorted(codes.keys()) == [f"img{i}" for i in range(N_IMAGES)]
    meta = codes.metadata
    assert meta["checksum"] and meta["dtype"] == "int16" and meta["views"] == ["original", "hflip"]
    assert meta["shape"] == [2, 4, 4] and "broken" in meta["corrupt"]
    assert {w for w in meta["writers"]} == {"part000-of-002", "part001-of-002"}

    model = DinoVQModel.from_pretrained(assets["tok"])
    for i in range(N_IMAGES):
        x = image_tensor(assets, i)
        grid = codes.get(f"img{i}")
        assert grid.shape == (4, 4) and grid.dtype == torch.int64
        assert torch.equal(grid, model.encode_code(x)[0])
        assert torch.equal(codes.get(f"img{i}", view=1), model.encode_code(torch.flip(x, dims=[-1]))[0])
        # round trip: stored codes -> decode_code -> the model's reconstruction of the image
        rec, _ = model.reconstruct(x)
        torch.testing.assert_close(model.decode_code(grid[None]), rec, rtol=0, atol=1e-6)
    with pytest.raises(IndexError, match="view 2"):
        codes.get("img0", view=2)


def test_resume_skips_cached_ids_and_refuses_another_tokenizer(assets, tmp_path):
    out = tmp_path / "codes"
    first = extract(assets, out, "--limit", "3")
    assert first[0].written == 3
    second = extract(assets, out)
    assert (second[0].written, second[0].already_cached, second[0].corrupt) == (N_IMAGES - 3, 3, 1)
    third = extract(assets, out)
    assert third[0].written == 0 and third[0].already_cached == N_IMAGES
    assert len(DinoVQCodes(out)) == N_IMAGES
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        extract(assets, out, tokenizer="tok_other")
    with pytest.raises(ValueError, match="views"):
        extract(assets, out, "--flip")


def test_code_dataset_views_and_labels(assets, tmp_path):
    out = tmp_path / "codes"
    extract(assets, out, "--flip")
    items = [(f"img{i}", i % 3) for i in range(N_IMAGES)]
    fixed = DinoVQCodeDataset(out, items)
    codes = DinoVQCodes(out)
    assert fixed[4]["label"] == 1 and torch.equal(fixed[4]["codes"], codes.get("img4"))
    rand = DinoVQCodeDataset(out, items, random_view=True, seed=0)
    seen = set()
    for epoch in range(4):
        rand.set_epoch(epoch)
        for i in range(N_IMAGES):
            got = rand[i]["codes"]
            view = 0 if torch.equal(got, codes.get(f"img{i}")) else 1
            assert torch.equal(got, codes.get(f"img{i}", view))
            seen.add(view)
    assert seen == {0, 1}
    with pytest.raises(KeyError, match="no codes"):
        DinoVQCodeDataset(out, [("nope", 0)])
