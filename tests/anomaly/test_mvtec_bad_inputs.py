"""MVTec loading on bad inputs: wrong-size masks, decompression bombs, 16-bit masks, the trainer flags."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.mvtec import MVTecAnomalyPairDataset, MVTecGoodDataset, _load_mask
from tests.bad_inputs import write_bomb_png, write_png


def _case(root: Path, image_hw: tuple[int, int], mask: np.ndarray) -> tuple[Path, Path]:
    for d in ("c/test/d", "c/ground_truth/d", "c/train/good"):
        (root / d).mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(0).integers(0, 256, (*image_hw, 3), dtype=np.uint8)
    Image.fromarray(img).save(root / "c/test/d/000.png")
    Image.fromarray(img).save(root / "c/train/good/000.png")
    mask_path = root / "c/ground_truth/d/000_mask.png"
    (write_png(mask_path, mask) if mask.dtype == np.uint16 else Image.fromarray(mask).save(mask_path))
    return root / "c/test/d/000.png", mask_path


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_mask_of_another_size_is_an_error_naming_both_files(tmp_path):
    _case(tmp_path, (16, 32), np.zeros((16, 16), np.uint8))  # image 32x16, mask 16x16
    with pytest.raises(ValueError, match=r"mask .*000_mask\.png is 16x16 but its image .*000\.png is 32x16"):
        MVTecAnomalyPairDataset(tmp_path, "c", "d", resolution=16, split_rule="ceil")


@pytest.mark.parametrize("resize_mode", ["bilinear", "bicubic_center_crop"])
def test_mask_size_mismatch_resize_follows_the_image_geometry(tmp_path, resize_mode):
    # true mask on the 32x16 image: columns 16..23, rows 4..11; the file holds it squashed to 16x16
    truth = np.zeros((16, 32), bool)
    truth[4:12, 16:24] = True
    squashed = np.zeros((16, 16), np.uint8)
    squashed[4:12, 8:12] = 255
    _case(tmp_path, (16, 32), squashed)
    ds = MVTecAnomalyPairDataset(
        tmp_path,
        "c",
        "d",
        resolution=16,
        split_rule="ceil",
        resize_mode=resize_mode,
        mask_size_mismatch="resize",
    )
    want = truth[:, 8:24]  # the image's centre crop at resolution 16
    assert _iou(ds.masks[0][0].numpy(), want) > 0.95
    # resized on its own (the old behaviour), the mask lands on other pixels than its anomaly
    alone = _load_mask(tmp_path / "c/ground_truth/d/000_mask.png", 16, resize_mode)[0].numpy()
    assert _iou(alone, want) < 0.6


def test_16bit_mask_is_scaled_before_binarising(tmp_path):
    mask = np.zeros((16, 16), np.uint16)
    mask[2:6, 2:6] = 65535
    mask[10:12, 10:12] = 30000  # 0.46: out (clipping to 8 bits would read it as 255, i.e. in)
    mask[13:15, 13:15] = 36000  # 0.55: in
    _case(tmp_path, (16, 16), mask)
    m = MVTecAnomalyPairDataset(tmp_path, "c", "d", resolution=16, split_rule="ceil").masks[0][0].numpy()
    assert m[2:6, 2:6].all() and not m[10:12, 10:12].any() and m[13:15, 13:15].all() and m.sum() == 16 + 4


def test_decompression_bomb_is_an_error_naming_the_file(tmp_path):
    _case(tmp_path, (16, 16), np.zeros((16, 16), np.uint8))
    write_bomb_png(tmp_path / "c/train/good/001.png")
    with pytest.raises(ValueError, match=r"001\.png: too many pixels"):
        MVTecGoodDataset(tmp_path, "c", 8)
    (tmp_path / "c/train/good/001.png").unlink()
    with pytest.raises(ValueError, match=r"000\.png: too many pixels: header says 16x16 = 256"):
        MVTecGoodDataset(tmp_path, "c", 8, max_pixels=255)
    with pytest.raises(ValueError, match=r"000_mask\.png: too many pixels"):
        _load_mask(tmp_path / "c/ground_truth/d/000_mask.png", 8, max_pixels=255)
    assert len(MVTecGoodDataset(tmp_path, "c", 8, max_pixels=256)) == 1


def test_trainer_flags(tmp_path):
    from train.anomaly.args import parse, stage2_parser

    base = ["--pretrained_model_name_or_path", "x", "--instance_data_dir", "x", "--mvtec_name", "c"]
    base += ["--output_dir", str(tmp_path), "--max_train_steps", "1", "--mvtec_anomaly_name", "d"]
    args = parse(stage2_parser(), [*base, "--mask_size_mismatch", "resize", "--max_image_pixels", "1000"])
    assert args.mask_size_mismatch == "resize" and args.max_image_pixels == 1000
    assert parse(stage2_parser(), base).mask_size_mismatch == "error"
    with pytest.raises(SystemExit, match="--max_image_pixels must be >= 1"):
        parse(stage2_parser(), [*base, "--max_image_pixels", "0"])


def _stage_main(script: str):
    from tests.core.trainers import Trainer

    return Trainer(script.split("/")[1], script, "", lambda *a: []).main()


@pytest.mark.parametrize(
    "stage, broken, message",
    [
        ("train/stage1-full/train.py", "bomb", r"001\.png: too many pixels"),
        ("train/stage1-full/train.py", "tiny", r"001\.png: too small: 1x1"),
        ("train/stage2-dual/train.py", "mask", r"000_mask\.png is 16x8 but its image"),
    ],
)
def test_bad_training_data_exits_2_with_one_message(stage, broken, message, tmp_path, capsys):
    """Issue 21 R1/R13: bad data found before any model is loaded ended with exit 1 and a chained traceback
    (ValueError); a 1x1 image was upscaled and trained on. Now: exit 2 and one message naming the file."""
    from utils.cli import run_cli

    root = tmp_path / "mvtec"
    _case(root, (16, 16), np.zeros((8, 16) if broken == "mask" else (16, 16), np.uint8))
    if broken == "bomb":
        write_bomb_png(root / "c/train/good/001.png")
    elif broken == "tiny":
        Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "c/train/good/001.png")
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "no_weights"), "--instance_data_dir", str(root)]
    argv += ["--mvtec_name", "c", "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1"]
    argv += ["--report_to", "none", "--mixed_precision", "no"]
    if "stage2" in stage:
        argv += ["--mvtec_anomaly_name", "d", "--split_rule", "ceil"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(_stage_main(stage), argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert re.search(message, " ".join(err.split())) and "Traceback" not in err, err
