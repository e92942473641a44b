"""What the demo shows a person: labelled figures, readable plots, one line where a flood was, and dtype
handling that really applies fp16 with the supported diffusers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def test_metric_plot_has_plain_ticks_and_the_random_weights_note():
    from utils.figures import RANDOM_WEIGHTS_NOTE, metric_vs_step_figure

    results = [  # random-Inception FIDs: equal to 4 digits, the case that printed "1e-17+2.099e-13"
        {"run": "aligned", "step": 10, "fid": 2.09942e-13, "sfid": 1.68937e-09},
        {"run": "aligned", "step": 20, "fid": 2.09977e-13, "sfid": 1.68963e-09},
        {"run": "baseline", "step": 20, "fid": 2.09975e-13, "sfid": 1.69040e-09},
    ]
    fig = metric_vs_step_figure(results, note=RANDOM_WEIGHTS_NOTE)
    fig.canvas.draw()
    for ax in fig.axes:
        assert "+" not in ax.yaxis.get_offset_text().get_text()  # a multiplier at most, never an added offset
        assert all(float(t) == int(t) for t in ax.get_xticks())  # steps are integers
    assert "random weights" in fig._suptitle.get_text()


def test_labelled_grid_checks_its_labels(tmp_path):
    from utils.figures import save_labelled_grid

    images = torch.rand(6, 3, 16, 16) * 2 - 1
    path = save_labelled_grid(
        images, tmp_path / "g.png", ncols=3, row_labels=["a", "b"], col_labels=list("xyz")
    )
    assert Image.open(path).size[0] > Image.open(path).size[1]  # 3 columns wider than 2 rows
    with pytest.raises(ValueError, match="3 row labels for 2 rows"):
        save_labelled_grid(images, tmp_path / "h.png", ncols=3, row_labels=["a", "b", "c"])


def test_demo_mask_figures_report_iou_on_synthetic_fg(tiny_assets, tmp_path, capsys):
    """The anomaly demo's figures: on fg = image x true mask the extracted masks match (IoU printed), while
    the generated noise fg gives all-white masks (stated, not hidden)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "demo_figs", Path("script/demo_anomaly_figures.py").resolve()
    )
    figs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figs)
    gen = tmp_path / "gen" / "hazelnut"
    for k in ("image", "fg", "mask"):
        (gen / "hole" / k).mkdir(parents=True)
        for i in range(2):
            value = 255 if k == "mask" else 90
            Image.fromarray(np.full((64, 64, 3), value, np.uint8)).save(gen / "hole" / k / f"{i:04d}.png")
    mean = figs.main(
        [
            "--gen_dir",
            str(gen),
            "--defect",
            "hole",
            "--mvtec_root",
            str(tiny_assets["mvtec"]),
            "--out",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    assert "100% foreground" in printed and "mean IoU" in printed
    assert (
        mean["crack"] > 0.95 and mean["hole"] > 0.8
    )  # same bounds as tests/anomaly/test_eval_mask_extraction
    assert (tmp_path / "generated_triplets.png").is_file() and (tmp_path / "mask_extraction.png").is_file()


def test_partial_imagenet_gives_one_summary_line(tmp_path, monkeypatch):
    import preprocessing.sample_imagenet_subset as sis

    classes = sis.load_class_index(sis.DEFAULT_CLASS_INDEX)
    split = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "train"
    for synset, _ in classes[:3]:
        (split / synset).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8)).save(split / synset / f"{synset}_{i}.JPEG")
    warnings = []
    monkeypatch.setattr(sis.logger, "warning", lambda msg, *a: warnings.append(msg % a if a else msg))
    sis.main(["--imagenet_root", str(tmp_path), "--per_class", "2", "--out", str(tmp_path / "s.csv")])
    assert len(warnings) == 1, warnings
    assert f"skipped {len(classes) - 3} of {len(classes)} classes" in warnings[0]
    assert "A partial ImageNet?" in warnings[0] and "\n" not in warnings[0]
    assert len((tmp_path / "s.csv.skipped.txt").read_text().splitlines()) == len(classes) - 3


def test_tiny_assets_table_printed_only_when_generated(tiny_assets, capsys):
    from preprocessing.make_tiny_assets import main

    assert main(["--out", str(tiny_assets["root"])]) == 0
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "up to date" in err
    main(["--out", str(tiny_assets["root"]), "--print_paths"])
    assert json.loads(capsys.readouterr().out)["sd15"] == str(tiny_assets["sd15"])


def test_empty_keep_in_fp32_warning_is_dropped_a_real_one_kept(tiny_assets):
    from diffusers import AutoencoderKL

    import utils.logging  # noqa: F401  (installs the filter)

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    handler = Keep()
    diffusers_logger.addHandler(handler)
    try:
        vae = AutoencoderKL.from_pretrained(tiny_assets["sd15"], subfolder="vae")
        vae.to(dtype=torch.float32)
        assert not [r for r in records if "kept in float32" in r.getMessage()]
        vae._keep_in_fp32_modules = ["conv_in"]  # a real list must still be reported
        vae.to(dtype=torch.float32)
        assert [r for r in records if "kept in float32: ['conv_in']" in r.getMessage()]
    finally:
        diffusers_logger.removeHandler(handler)


def test_generate_applies_fp16_with_the_supported_diffusers(tiny_assets, tmp_path):
    """eval/generate.py passes dtype= to from_pretrained; diffusers releases that ignore it are below the
    requirements' lower bound, and this checks the installed one applies it."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    from eval.generate import load_stage1_pipeline, parse_args

    unet = UNet2DConditionModel.from_pretrained(tiny_assets["sd15"], subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet)
    )
    args = parse_args(
        [
            "stage1",
            "--pretrained_model_name_or_path",
            str(tiny_assets["sd15"]),
            "--lora_dir",
            str(tmp_path / "lora"),
        ]
        + ["--mvtec_name", "hazelnut", "--device", "cpu", "--dtype", "fp16"]
    )
    pipe = load_stage1_pipeline(args)
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float16
    assert pipe.text_encoder.dtype == torch.float16
