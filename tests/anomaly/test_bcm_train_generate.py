"""BCM stage 2 end to end on the tiny assets: the background condition as the reference builds it, the trainer
with --bcm, generation from its weights, and the errors for missing foreground masks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _load_main(rel: str):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_").replace("-", "_"), REPO / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _disc_mask(size: tuple[int, int], soft: bool) -> Image.Image:
    """A salient-object-like mask: a white disc (soft edge: a saliency map, values in between)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(xx - w * 0.55, yy - h * 0.45) / (0.3 * min(w, h))
    m = np.clip((1.3 - r) / 0.6, 0, 1) if soft else (r < 1).astype(float)
    return Image.fromarray((m * 255).round().astype(np.uint8), "L")


@pytest.fixture(scope="module")
def fg_masks(tiny_assets, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fg_masks")
    cls = tiny_assets["mvtec"] / "hazelnut"
    for sub, src in (("hole", cls / "test" / "hole"), ("good", cls / "train" / "good")):
        (root / "hazelnut" / sub).mkdir(parents=True)
        for p in sorted(src.glob("*.png")):
            with Image.open(p) as im:
                _disc_mask(im.size, soft=sub == "good").save(root / "hazelnut" / sub / p.name)
    return root


def test_background_is_the_references_cut_out(tiny_assets, fg_masks):
    """image * (255 - m) / 255 (PIL's paste through the inverted mask), soft masks included."""
    from datasets.bcm_background import background_image

    image_path = sorted((tiny_assets["mvtec"] / "hazelnut" / "train" / "good").glob("*.png"))[0]
    mask_path = fg_masks / "hazelnut" / "good" / image_path.name
    got = np.asarray(background_image(image_path, mask_path), dtype=np.float64)
    img = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float64)
    m = np.asarray(Image.open(mask_path), dtype=np.float64)[..., None]
    assert 0 < (m[..., 0] % 255).astype(bool).mean()  # the mask really is soft
    np.testing.assert_allclose(got, img * (255 - m) / 255, atol=1.0)


def test_pairs_carry_their_background_with_the_same_flips(tiny_assets, fg_masks):
    """Binary mask: the background is black (-1) on the object and the image elsewhere, flipped with the pair."""
    from datasets.bcm_background import BackgroundPairDataset
    from datasets.mvtec import MVTecAnomalyPairDataset, apply_flip

    pairs = MVTecAnomalyPairDataset(tiny_assets["mvtec"], "hazelnut", "hole", 32)
    data = BackgroundPairDataset(pairs, fg_masks, "hazelnut", "hole", 32)
    with Image.open(pairs.paths[0]) as im:
        disc = _disc_mask(im.size, soft=False).resize((32, 32), Image.NEAREST)
    obj = torch.from_numpy(np.asarray(disc) > 127)
    near_edge = torch.nn.functional.max_pool2d(obj[None, None].float(), 5, 1, 2)[0, 0].bool()
    codes = set()
    for seed in range(12):
        item = data[(0, seed)]
        codes.add(item["flip"])
        cond, pix = item["condition_values"], item["pixel_values"]
        inner = apply_flip(
            (obj & ~torch.nn.functional.max_pool2d((~obj)[None, None].float(), 5, 1, 2)[0, 0].bool())[None],
            item["flip"],
        )[0]
        outer = apply_flip((~near_edge)[None], item["flip"])[0]
        assert inner.any() and outer.any()
        torch.testing.assert_close(cond[:, inner], torch.full_like(cond[:, inner], -1.0))
        torch.testing.assert_close(cond[:, outer], pix[:, outer], atol=2 / 127.5, rtol=0)
    assert len(codes) > 1


def test_missing_masks_are_named(tiny_assets, fg_masks, tmp_path):
    import shutil

    from datasets.bcm_background import BackgroundPairDataset, good_background_paths
    from datasets.mvtec import MVTecAnomalyPairDataset

    partial = tmp_path / "masks"
    shutil.copytree(fg_masks, partial)
    gone = sorted((partial / "hazelnut" / "hole").glob("*.png"))[0]
    gone.unlink()
    pairs = MVTecAnomalyPairDataset(tiny_assets["mvtec"], "hazelnut", "hole", 32)
    with pytest.raises(FileNotFoundError, match=str(gone.name)) as err:
        BackgroundPairDataset(pairs, partial, "hazelnut", "hole", 32)
    assert "U-2-Net" in str(err.value)
    with pytest.raises(FileNotFoundError, match="carpet/good"):
        good_background_paths(tiny_assets["mvtec"], "carpet", partial)


def _train_args(tiny, out: Path, masks: Path, steps: int) -> list[str]:
    return [
        "--mixed_precision", "no", "--mvtec_name", "hazelnut", "--mvtec_anamaly_name", "hole",
        "--pretrained_model_name_or_path", str(tiny["sd15"]), "--instance_data_dir", str(tiny["mvtec"]),
        "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "2", "--learning_rate", "1e-3",
        "--max_train_steps", str(steps), "--rank", "2", "--checkpointing_steps", "2", "--report_to", "none",
        "--seed", "3", "--bcm", "--bcm_fg_mask_dir", str(masks),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def bcm_run(tiny_assets, fg_masks, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bcm") / "stage2"
    assert _load_main("train/stage2-dual/train.py")(_train_args(tiny_assets, out, fg_masks, 2)) == 0
    return out


def test_bcm_trains_its_compensation(bcm_run):
    from safetensors.torch import load_file

    config = json.loads((bcm_run / "dual_config.json").read_text())
    assert config["background_compensation"] and config["bcm_mlp_hidden"] == 320
    weights = load_file(str(bcm_run / "dual_unet.safetensors"))
    mix = {k: v for k, v in weights.items() if k.endswith(".mix")}
    assert mix and all(k.endswith("attn1.mix") for k in mix)  # self-attention layers only
    assert all(v.abs().item() > 0 for v in mix.values()), "a (starting at 0) gets gradients and moves"
    assert (bcm_run / "checkpoint-2" / "dual_config.json").is_file()


def test_bcm_generates_triplets_and_names_what_is_missing(tiny_assets, fg_masks, bcm_run, tmp_path):
    from utils.cli import UserError

    gen = _load_main("eval/generate.py")
    base = [
        "stage2", "--pretrained_model_name_or_path", str(tiny_assets["sd15"]), "--weights_dir", str(bcm_run),
        "--mvtec_name", "hazelnut", "--mvtec_anomaly_name", "hole", "--num_images", "2",
        "--num_inference_steps", "2", "--device", "cpu", "--preset", "official_bcm",
    ]  # fmt: skip
    out = gen(base + ["--output_root", str(tmp_path / "gen")])
    for sub in ("image", "fg", "mask"):
        assert sorted(p.name for p in (out / sub).glob("*.png")) == ["0000.png", "0001.png"]
    with pytest.raises((UserError, FileNotFoundError), match="foreground masks of good images"):
        gen(base + ["--output_root", str(tmp_path / "gen2"), "--bcm_fg_mask_dir", str(tmp_path / "none")])


def test_bcm_flag_errors():
    from train.anomaly.args import parse, stage2_parser

    base = ["--pretrained_model_name_or_path", "x", "--instance_data_dir", "d", "--mvtec_name", "hazelnut",
            "--mvtec_anamaly_name", "hole", "--output_dir", "o", "--bcm"]  # fmt: skip
    with pytest.raises(SystemExit, match="bcm_fg_mask_dir"):
        parse(stage2_parser(), base)
    with pytest.raises(SystemExit, match="gradient_checkpointing"):
        parse(stage2_parser(), base + ["--bcm_fg_mask_dir", "m", "--gradient_checkpointing"])


def test_stand_in_masks(tiny_assets, tmp_path):
    """border: a bright object on a dark uniform background is found; the CLI writes the --bcm_fg_mask_dir layout."""
    from preprocessing.make_fg_masks import border_mask, main

    truth = np.asarray(_disc_mask((48, 48), soft=False)) > 0
    rgb = np.where(truth[..., None], np.array([200, 150, 90]), np.array([10, 12, 8])).astype(np.uint8)
    got = border_mask(rgb)
    assert (got & truth).sum() / (got | truth).sum() > 0.9
    assert main(["--mvtec_root", str(tiny_assets["mvtec"]), "--mvtec_name", "hazelnut", "--subsets", "hole", "good",
                 "--output_dir", str(tmp_path), "--method", "empty"]) == 0  # fmt: skip
    names = sorted(p.name for p in (tiny_assets["mvtec"] / "hazelnut" / "test" / "hole").glob("*.png"))
    assert sorted(p.name for p in (tmp_path / "hazelnut" / "hole").iterdir()) == names
    assert (tmp_path / "hazelnut" / "good").is_dir()
