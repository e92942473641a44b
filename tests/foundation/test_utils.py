"""Shared utilities: atomic writes, checkpoint discovery, config overrides, image helpers, weights errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from utils.checkpoint import (
    atomic_write,
    find_latest_checkpoint,
    prune_checkpoints,
    resolve_resume_path,
    save_safetensors_atomic,
)
from utils.config import apply_overrides, load_config
from utils.images import load_rgb, make_grid_image, pil_to_tensor, to_pil
from utils.weights import MissingWeightsError, require_file, resolve_hf_path


def test_atomic_write_leaves_target_untouched_on_error(tmp_path):
    target = tmp_path / "ckpt.bin"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.bin"]  # no temp left behind


def test_atomic_write_replaces_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a").write_text("1")
    with atomic_write(target) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_safetensors_roundtrip(tmp_path):
    from safetensors.torch import load_file

    t = {"w": torch.randn(3, 4).t()}  # non-contiguous on purpose
    save_safetensors_atomic(t, tmp_path / "w.safetensors", metadata={"k": "v"})
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], t["w"])


def test_latest_resume_and_prune(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    assert resolve_resume_path(tmp_path, "latest") is None
    for step in (5, 100, 20):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-100"  # numeric, not lexical
    assert resolve_resume_path(tmp_path, "latest").name == "checkpoint-100"
    with pytest.raises(FileNotFoundError, match="checkpoint-5"):
        resolve_resume_path(tmp_path, str(tmp_path / "checkpoint-7"))
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-100", "checkpoint-20", "checkpoint-x"]


def test_config_overrides_and_base(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.1\n  steps: 10\nname: a\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  steps: 20\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.lr=1e-4", "name=[1, 2]"])
    assert cfg == {"train": {"lr": 1e-4, "steps": 20}, "name": [1, 2]}
    with pytest.raises(KeyError, match="valid keys"):
        apply_overrides(cfg, ["train.lrr=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_overrides(cfg, ["train.lr"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_config_reads_yes_no_on_off_as_strings(tmp_path):
    # YAML 1.1 would turn these into booleans: mixed_precision "no" would reach accelerate as False.
    (tmp_path / "c.yaml").write_text(
        "train:\n  mixed_precision: no\n  flag: true\n  mode: off\n  x: yes\n  other: 1\n  b: 1\n  n: 1\n"
    )
    cfg = load_config(tmp_path / "c.yaml", ["train.other=no", "train.b=False", "train.n=null"])
    assert cfg["train"] == {
        "mixed_precision": "no",
        "flag": True,
        "mode": "off",
        "x": "yes",
        "other": "no",
        "b": False,
        "n": None,
    }


def test_images(tmp_path):
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    back = pil_to_tensor(to_pil(x[0]))
    assert (back - x[0]).abs().max() <= 1 / 255 + 1e-6
    grid = make_grid_image(x, nrow=2, padding=1)
    assert grid.size == (2 * 8 + 3, 8 + 2)
    good = tmp_path / "ok.png"
    Image.new("RGB", (4, 4), "red").save(good)
    assert load_rgb(good).getpixel((0, 0)) == (255, 0, 0)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:20])  # truncated
    assert load_rgb(bad) is None
    assert load_rgb(tmp_path / "missing.png") is None


def test_missing_weights_messages(tmp_path):
    with pytest.raises(MissingWeightsError, match="vgg16.pth.*download it"):
        require_file(tmp_path / "vgg16.pth", "VGG16", "download it")
    with pytest.raises(MissingWeightsError, match="nobody/nothing"):
        resolve_hf_path("nobody/nothing", "SD-1.5")
    (tmp_path / "model").mkdir()
    with pytest.raises(MissingWeightsError, match=r"missing \['model_index.json'\]"):
        resolve_hf_path(tmp_path / "model", "SD-1.5", required_files=["model_index.json"])
