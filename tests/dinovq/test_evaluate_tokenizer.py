"""eval/evaluate_dinovq.py: metrics against direct computations and clean-fid on saved PNGs; layouts; errors."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.evaluate_dinovq import evaluate_tokenizer, list_items
from eval.evaluate_dinovq import main as eval_main
from models.dinovq import DinoVQModel
from train.dinovq.data import resize_crop
from utils.cli import UserError
from utils.images import pil_to_tensor

_spec = importlib.util.spec_from_file_location("dinovq_test_helpers", Path(__file__).parent / "helpers.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor")
SYNSETS = ("n01440764", "n01443537")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_tok")
    model = helpers.tiny_model(seed=0)
    model.compute_loss(*helpers.batch(0))
    model.save_pretrained(root / "tok")
    val = root / "imagenet" / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    rng = np.random.default_rng(0)
    for c, syn in enumerate(SYNSETS):
        (val / syn).mkdir(parents=True)
        for i in range(3):
            arr = (rng.random((30 + 4 * i, 33, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(val / syn / f"ILSVRC2012_val_{c}{i}.JPEG", quality=95)
    (val / SYNSETS[0] / "broken.JPEG").write_bytes(b"no")
    return {"root": root, "tok": root / "tok", "imagenet": root / "imagenet", "val": val}


def reference_metrics(assets, lpips_fn=None):
    """PSNR / LPIPS per image and codebook usage computed directly from the model, image by image."""
    model = DinoVQModel.from_pretrained(assets["tok"])
    out = {}
    for syn in SYNSETS:
        for p in sorted((assets["val"] / syn).glob("ILSVRC*.JPEG")):
            x = pil_to_tensor(resize_crop(Image.open(p).convert("RGB"), (28, 28), None, False))[None]
            rec, idx = model.reconstruct(x)
            r = ((rec.clamp(-1, 1) + 1) * 127.5).round() / 255.0
            x01 = (x + 1) / 2
            mse = float(((r - x01) ** 2).mean())
            entry = {"psnr": 10 * math.log10(1 / mse), "codes": idx.flatten().tolist(), "class": syn}
            if lpips_fn is not None:
                entry["lpips"] = float(lpips_fn(r * 2 - 1, x01 * 2 - 1).flatten()[0])
            out[f"{syn}/{p.stem}"] = entry
    return out


def lpips_stand_in(a, b):
    """Any per-image distance shows the aggregation (building LPIPS' random VGG16 costs ~15 s of CPU)."""
    return ((a - b).abs() ** 1.5).mean(dim=(1, 2, 3), keepdim=True)


def test_metrics_per_class_and_unreadable(assets):
    lpips_fn = lpips_stand_in
    items = list_items(assets["imagenet"])
    assert {i.label for i in items} == set(SYNSETS) and len(items) == 7
    model = DinoVQModel.from_pretrained(assets["tok"])
    results, shown = evaluate_tokenizer(
        model, items, lpips_fn=lpips_fn, batch_size=4, per_class=True, grid_images=3
    )
    ref = reference_metrics(assets, lpips_fn)
    m = results["metrics"]
    assert results["num_images"] == 6 and results["num_unreadable"] == 1
    assert m["psnr"] == pytest.approx(np.mean([r["psnr"] for r in ref.values()]), rel=1e-5)
    assert m["lpips"] == pytest.approx(np.mean([r["lpips"] for r in ref.values()]), rel=1e-4)
    codes = [c for r in ref.values() for c in r["codes"]]
    assert m["codebook_usage"] == pytest.approx(len(set(codes)) / 16)
    for syn in SYNSETS:
        mine = [r for r in ref.values() if r["class"] == syn]
        got = results["per_class"][syn]
        assert got["num_images"] == 3
        assert got["psnr"] == pytest.approx(np.mean([r["psnr"] for r in mine]), rel=1e-5)
        used = {c for r in mine for c in r["codes"]}
        assert got["codebook_usage"] == pytest.approx(len(used) / 16)
    assert len(shown) == 3 and 0.0 <= m["ssim"] <= 1.0


def test_cli_rfid_equals_clean_fid_on_saved_pngs(assets, tmp_path, random_inception_torchscript, fast_sqrtm):
    from cleanfid.fid import compute_fid

    from eval.inception import load_inception

    out = tmp_path / "out"
    results = eval_main(
        [
            "--tokenizer", str(assets["tok"]), "--data", str(assets["imagenet"]), "--output_dir", str(out),
            "--no_lpips", "--inception_path", str(random_inception_torchscript), "--num_workers", "0",
            "--batch_size", "4", "--save_images", "--per_class", "--device", "cpu",
        ]
    )  # fmt: skip
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["rfid"] == pytest.approx(results["metrics"]["rfid"])
    assert (out / "reconstructions.png").is_file() and set(saved["per_class"]) == set(SYNSETS)
    net = load_inception(random_inception_torchscript)
    ref = compute_fid(
        str(out / "inputs"),
        str(out / "reconstructions"),
        mode="clean",
        custom_feat_extractor=net.pool,
        device=torch.device("cpu"),
        num_workers=0,
        verbose=False,
    )
    assert results["metrics"]["rfid"] == pytest.approx(ref, rel=1e-4) and ref > 0
    assert len(list((out / "reconstructions").rglob("*.png"))) == 6


def test_flat_val_layout_labels_and_protocol_checks(assets, tmp_path):
    flat = tmp_path / "imagenet"
    val = flat / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    val.mkdir(parents=True)
    with open(flat / "LOC_val_solution.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for syn in SYNSETS:
            for p in sorted((assets["val"] / syn).glob("ILSVRC*.JPEG")):
                (val / p.name).write_bytes(p.read_bytes())
                w.writerow([p.stem, f"{syn} 1 2 3 4"])
    items = list_items(flat)
    assert {i.id: i.label for i in items}["ILSVRC2012_val_10"] == SYNSETS[1]
    base = ["--tokenizer", str(assets["tok"]), "--output_dir", str(tmp_path / "o"), "--no_lpips", "--no_rfid"]
    with pytest.raises(UserError, match="50,000"):
        eval_main([*base, "--data", str(flat), "--protocol", "imagenet_val_50k"])
    with pytest.raises(UserError, match="ImageNet root"):
        eval_main([*base, "--data", str(assets["val"] / SYNSETS[0]), "--protocol", "imagenet_val_50k"])
    res = eval_main(
        [*base, "--data", str(flat), "--num_images", "2", "--num_workers", "0", "--device", "cpu"]
    )
    assert res["num_images"] == 2


def test_missing_weights_fail_clearly(assets, tmp_path):
    from utils.weights import MissingWeightsError

    base = [
        "--tokenizer",
        str(assets["tok"]),
        "--data",
        str(assets["imagenet"]),
        "--output_dir",
        str(tmp_path),
    ]
    with pytest.raises(MissingWeightsError, match="VGG16"):
        eval_main([*base, "--no_rfid", "--vgg_ckpt_path", str(tmp_path / "nope.pth")])
    with pytest.raises(MissingWeightsError):
        eval_main([*base, "--no_lpips", "--inception_path", str(tmp_path / "nope.pt")])
    with pytest.raises(MissingWeightsError, match="tokenizer"):
        eval_main([*base[2:], "--tokenizer", str(tmp_path / "none"), "--no_lpips", "--no_rfid"])
