"""The downstream trainers on the training core: same seed -> same run; stop + resume == uninterrupted;
the jobs' outputs, the results table and the demo script."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from datasets.mvtec import few_shot_split
from eval.downstream.data import DEFAULT_SPLIT_RULE, DownstreamDataError
from preprocessing.standin_generated import write_standin_pairs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen") / "generate_data"
    write_standin_pairs(root, "hazelnut", num_images=4, size=64)
    return root


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7, msg=k)


def _run_pair(main, common: list[str], tmp: Path, skip_eval_b: bool = True) -> tuple[Path, Path]:
    """Run A: 4 steps straight. Run B: the same seed stopped at step 2 (its checkpoint), then resumed to 4.

    The LR drops after steps 3 and 4 (milestones 0.8 and 0.9 of 4 steps), so the resumed half crosses them."""
    a, b = tmp / "a", tmp / "b"
    main(common + ["--output_dir", str(a), "--checkpointing_steps", "100"])  # only the final checkpoint
    extra = ["--skip_eval"] if skip_eval_b else []
    main(common + ["--output_dir", str(b), "--stop_at_step", "2"] + extra)
    assert (
        sorted(_losses(b)) == [1, 2]
        and (b / "checkpoint-2").is_dir()
        and not (b / "model.safetensors").exists()
    )
    main(common + ["--output_dir", str(b), "--resume_from_checkpoint", "latest"] + extra)
    return a, b


@pytest.fixture(scope="module")
def localization_runs(tiny_assets, generated, tmp_path_factory):
    from eval.downstream.localization import main

    common = [
        "--class_name", "hazelnut", "--mvtec_root", str(tiny_assets["mvtec"]), "--generated_root",
        str(generated), "--resolution", "64", "--base_width", "4", "--train_batch_size", "2",
        "--max_train_steps", "4", "--checkpointing_steps", "2", "--log_every", "1", "--report_to", "none",
        "--mixed_precision", "no", "--seed", "5", "--eval_batch_size", "4", "--num_figure_images", "3",
        "--note", "test run: meaningless",
    ]  # fmt: skip
    return _run_pair(main, common, tmp_path_factory.mktemp("loc"))


def test_localization_same_seed_and_resume_are_exact(localization_runs):
    a, b = localization_runs
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-6, abs=1e-8), step
    _same_weights(a, b)
    # the weights inside a checkpoint are safetensors, never a pickled model
    assert (a / "checkpoint-4" / "model.safetensors").is_file()
    assert not list((a / "checkpoint-4").glob("pytorch_model*")) and not list(
        (a / "checkpoint-4").glob("model.bin")
    )


def test_localization_outputs(localization_runs, tiny_assets):
    a, _ = localization_runs
    rec = json.loads((a / "metrics.json").read_text())
    assert rec["job"] == "localization" and rec["method"] == "generated" and "meaningless" in rec["note"]
    assert set(rec["metrics"]) == {"all", "crack", "hole"}
    assert set(rec["metrics"]["all"]) == {
        "image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "au_pro"
    }  # fmt: skip
    # nothing the generator was trained on is tested
    root = tiny_assets["mvtec"]
    for d in ("crack", "hole"):
        train, _ = few_shot_split(sorted((root / "hazelnut" / "test" / d).iterdir()), DEFAULT_SPLIT_RULE)
        assert not {str(p.relative_to(root)) for p in train} & set(rec["test_images"])
    assert rec["n_test_images"]["good"] == 3
    assert (a / "metrics.csv").read_text().splitlines()[0].startswith("scope,image_auroc")
    assert (a / "predictions.png").stat().st_size > 1000
    config = json.loads((a / "model_config.json").read_text())
    assert config["base_width"] == 4 and config["defects"] == ["crack", "hole"]
    # manifest.json next to the result: flags, commit, the generated sets (stand-ins: no manifest), outputs
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["kind"] == "evaluation" and manifest["job"] == "localization"
    assert (
        manifest["inputs"] == {"crack": None, "hole": None}
        and manifest["flags"]["au_pro_rule"] == "dualanodiff"
    )
    outputs = {o["name"]: o["sha256"] for o in manifest["outputs"]}
    assert outputs["metrics.json"] == hashlib.sha256((a / "metrics.json").read_bytes()).hexdigest()


def test_saved_anomaly_maps_rescore_to_the_same_metrics(localization_runs, tiny_assets):
    import numpy as np
    from PIL import Image

    from eval.downstream.anomaly_maps import main as maps_cli
    from eval.downstream.anomaly_maps import read_index, score

    a, _ = localization_runs
    rec = json.loads((a / "metrics.json").read_text())
    maps_dir = a / "anomaly_maps"
    rows = read_index(maps_dir)
    assert len(rows) == len(rec["test_images"]) and rows[0]["tiff"] == ""  # default: npy only
    first = next(r for r in rows if r["defect"] != "good")
    m = np.load(maps_dir / first["npy"])
    assert m.shape == (64, 64) and m.dtype == np.float32 and 0 <= m.min() <= m.max() <= 1
    assert first["npy"] == f"hazelnut/test/{first['defect']}/{Path(first['image']).stem}.npy"
    # the same numbers as metrics.json, from the saved maps and the ground-truth paths alone
    again = score(maps_dir)
    for scope, metrics in rec["metrics"].items():
        for k, v in metrics.items():
            assert again[scope][k] == pytest.approx(v, abs=1e-6), (scope, k)
    mvtec = score(maps_dir, au_pro_rule="mvtec")
    assert mvtec["all"]["pixel_auroc"] == pytest.approx(rec["metrics"]["all"]["pixel_auroc"], abs=1e-6)
    # MVTec's evaluate_experiment.py layout: <maps>/<class>/test/<defect>/<id>.tiff at the image size, and a
    # dataset folder holding exactly the evaluated images and their <id>_mask.png ground truth
    assert maps_cli(["tiff", "--maps_dir", str(maps_dir)]) == {"tiff": len(rows)}
    first = next(r for r in read_index(maps_dir) if r["defect"] != "good")
    with Image.open(maps_dir / first["tiff"]) as im, Image.open(first["image"]) as src:
        assert im.mode == "F" and im.size == src.size
        full = np.asarray(im)
    assert abs(float(full.mean()) - float(m.mean())) < 0.05  # a resize of the same map
    subset = maps_dir / "mvtec_subset" / "hazelnut"
    stem = Path(first["image"]).stem
    assert (subset / "test" / first["defect"] / f"{stem}.png").is_file()
    assert (subset / "ground_truth" / first["defect"] / f"{stem}_mask.png").is_file()
    n_subset = sum(1 for _ in (subset / "test").rglob("*.png"))
    assert n_subset == len(rows)  # only the held-out test images


def test_perlin_baseline_and_table(tiny_assets, localization_runs, tmp_path):
    from eval.downstream.localization import main
    from eval.downstream.make_table import make_tables

    a, _ = localization_runs
    out = tmp_path / "hazelnut" / "localization-perlin"
    rec = main(
        [
            "--source", "perlin", "--class_name", "hazelnut", "--mvtec_root", str(tiny_assets["mvtec"]),
            "--resolution", "64", "--base_width", "4", "--train_batch_size", "2", "--max_train_steps", "2",
            "--report_to", "tensorboard", "--mixed_precision", "no", "--output_dir", str(out),
            "--num_figure_images", "2", "--anomaly_maps", "none",
        ]
    )  # fmt: skip
    assert rec["method"] == "perlin" and rec["train_images"] == {"good": 8, "textures": 8}
    assert not (out / "anomaly_maps").exists()
    # the evaluation table and its headline numbers reached TensorBoard (--report_to)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "logs" / "downstream-localization-perlin"), size_guidance={"tensors": 0})
    ea.Reload()
    assert ea.Scalars("eval/localization/au_pro")[0].value == pytest.approx(rec["metrics"]["all"]["au_pro"])
    text = ea.Tensors("eval/localization/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.startswith("| scope | image_auroc |") and "| all |" in text
    (tmp_path / "hazelnut" / "localization-generated").mkdir()
    shutil.copy(a / "metrics.json", tmp_path / "hazelnut" / "localization-generated" / "metrics.json")
    table = make_tables(tmp_path)
    assert (
        "| hazelnut | generated pairs |" in table and "| hazelnut | Perlin baseline (DRAEM-style) |" in table
    )
    assert "test run: meaningless" in table


def test_classification_same_seed_and_resume_are_exact(tiny_assets, generated, tmp_path):
    from eval.downstream.classification import main

    common = [
        "--class_name", "hazelnut", "--mvtec_root", str(tiny_assets["mvtec"]), "--generated_root",
        str(generated), "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "4",
        "--checkpointing_steps", "2", "--checkpoints_total_limit", "1", "--log_every", "1", "--report_to",
        "none", "--mixed_precision", "no", "--seed", "3", "--resnet_weights", "none",
    ]  # fmt: skip
    a, b = _run_pair(main, common, tmp_path)
    la, lb = _losses(a), _losses(b)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4]
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-6, abs=1e-8), step
    _same_weights(a, b)
    rec = json.loads((a / "metrics.json").read_text())
    assert (
        rec["labels"] == ["crack", "hole"] and rec["imagenet_weights"] is None and "random" in rec["warning"]
    )
    held = {
        d: len(
            few_shot_split(
                sorted((tiny_assets["mvtec"] / "hazelnut/test" / d).iterdir()), DEFAULT_SPLIT_RULE
            )[1]
        )
        for d in ("crack", "hole")
    }
    assert rec["n_test_images"] == held
    assert sum(map(sum, rec["confusion"])) == sum(held.values())
    assert 0 <= rec["metrics"]["accuracy"] <= 1 and (a / "confusion.png").is_file()


def test_resnet_weights_offline(tmp_path, monkeypatch, caplog):
    from eval.downstream.resnet import build_resnet34, resnet34_cache_path
    from utils.weights import MissingWeightsError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with caplog.at_level("WARNING"):
        _, source = build_resnet34(3, "auto")
    assert (
        source is None and "RANDOM initialisation" in caplog.text and "resnet34-b627a593.pth" in caplog.text
    )
    with pytest.raises(MissingWeightsError, match="does not exist"):
        build_resnet34(3, str(tmp_path / "missing.pth"))
    from torchvision.models import resnet34

    reference = resnet34(weights=None)
    path = resnet34_cache_path()
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model, source = build_resnet34(3, "auto")
    assert source == str(path) and model.fc.out_features == 3
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight)


def test_bad_inputs_fail_before_training(tiny_assets, generated, tmp_path):
    from eval.downstream.classification import main as classification
    from eval.downstream.localization import main as localization

    base = ["--class_name", "hazelnut", "--mvtec_root", str(tiny_assets["mvtec"]), "--max_train_steps", "1"]
    empty = tmp_path / "empty_gen"
    (empty / "hazelnut" / "hole" / "image").mkdir(parents=True)
    with pytest.raises(DownstreamDataError, match="no generated pairs for defect type 'crack'"):
        localization(base + ["--generated_root", str(empty), "--output_dir", str(tmp_path / "l")])
    with pytest.raises(DownstreamDataError, match="at least 2 defect types"):
        classification(
            base
            + ["--generated_root", str(generated), "--defects", "hole", "--output_dir", str(tmp_path / "c")]
        )
    assert not (tmp_path / "l").exists() and not (tmp_path / "c").exists()
    with pytest.raises(SystemExit):
        localization(base + ["--output_dir", str(tmp_path / "x"), "--resolution", "48"])


def test_demo_script(tmp_path):
    env = {
        **os.environ,
        "OUT": str(tmp_path / "demo"),
        "LOC_STEPS": "2",
        "CLS_STEPS": "2",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        ["bash", "script/demo_downstream.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = (tmp_path / "demo" / "results.md").read_text()
    assert "values are meaningless" in results and "random initialisation" in results
    for job in ("localization-generated", "localization-perlin", "classification"):
        assert (tmp_path / "demo" / "hazelnut" / job / "metrics.json").is_file(), job
    assert (tmp_path / "demo" / "hazelnut" / "localization-generated" / "predictions.png").is_file()
