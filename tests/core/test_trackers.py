"""--report_to: accelerate's tracker names, up-front failure for a tracker that is not installed, and images /
tables reaching every active tracker.

Trackers that ran for real here: TensorBoard (its event files are read back). wandb, comet_ml and mlflow are not
installed in the test environment (and are not installed for the test): the "not installed" errors are tested
for them, and the calls made to them are checked against stand-ins with the trackers' accelerate names.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from train.core.trackers import TRACKERS, log_images, log_table, resolve_report_to
from utils.cli import UserError, run_cli

NOT_INSTALLED = [n for n in ("wandb", "comet_ml", "mlflow") if importlib.util.find_spec(n) is None]


def test_names_are_accelerates():
    from accelerate.utils import LoggerType

    assert set(TRACKERS) | {"all"} == {t.value for t in LoggerType}


def test_resolve_report_to():
    assert (
        resolve_report_to("none") is None
        and resolve_report_to(None) is None
        and resolve_report_to("") is None
    )
    assert resolve_report_to("tensorboard") == "tensorboard"
    assert resolve_report_to("tensorboard,tensorboard") == "tensorboard"
    assert "tensorboard" in resolve_report_to("all").split(",")
    with pytest.raises(UserError, match="unknown tracker"):
        resolve_report_to("tensorbord")
    with pytest.raises(UserError, match="stands alone"):
        resolve_report_to("none,tensorboard")


@pytest.mark.parametrize("name", NOT_INSTALLED)
def test_named_tracker_not_installed_is_a_user_error(name):
    with pytest.raises(UserError, match=f"{name} is not installed .pip install {name}"):
        resolve_report_to(name)
    with pytest.raises(UserError, match="not installed"):
        resolve_report_to(f"tensorboard,{name}")


@pytest.mark.skipif(not NOT_INSTALLED, reason="every optional tracker is installed")
def test_cli_exits_2_before_any_work(tmp_path, capsys):
    """A trainer's command line with a missing tracker stops at argument parsing with exit code 2."""
    from eval.downstream.localization import main

    name = NOT_INSTALLED[0]
    argv = [
        "--class_name",
        "x",
        "--mvtec_root",
        str(tmp_path / "absent"),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    with pytest.raises(SystemExit) as exc:
        run_cli(main, [*argv, "--report_to", name])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{name} is not installed" in err and "absent" not in err  # failed before looking at the data


def test_core_config_resolves_and_rejects(tmp_path):
    from train.core import CoreConfig

    assert CoreConfig(output_dir=str(tmp_path), max_steps=1, report_to="none").report_to is None
    if NOT_INSTALLED:
        with pytest.raises(UserError, match="not installed"):
            CoreConfig(output_dir=str(tmp_path), max_steps=1, report_to=NOT_INSTALLED[0])


def _accelerator(tmp_path, report_to):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        cpu=True,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(tmp_path), logging_dir=str(tmp_path / "logs")),
    )


def test_images_and_tables_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = _accelerator(tmp_path, ["tensorboard"])
    acc.init_trackers("run")
    images = torch.rand(3, 3, 8, 10)
    log_images(acc, "validation", images, step=5, nrow=3)
    log_table(acc, "eval/localization", ["scope", "au_pro"], [["all", 0.61234], ["crack", 0.5]], step=5)
    acc.log({"eval/localization/au_pro": 0.61234}, step=5)
    acc.end_training()
    ea = EventAccumulator(str(tmp_path / "logs" / "run"), size_guidance={"images": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    assert tags["images"] == ["validation"]
    ev = ea.Images("validation")[0]
    assert (ev.step, ev.width, ev.height) == (5, 3 * 10, 8)  # add_images: the 3 images side by side
    text_tag = next(t for t in tags["tensors"] if t.startswith("eval/localization"))
    text = ea.Tensors(text_tag)[0].tensor_proto.string_val[0].decode()
    assert "| scope | au_pro |" in text and "| all | 0.6123 |" in text and "| crack | 0.5000 |" in text
    assert ea.Scalars("eval/localization/au_pro")[0].value == pytest.approx(0.61234)


class _Recorder:
    def __init__(self, name):
        self.name = name
        self.calls = []
        self.tracker = self  # comet_ml: the Experiment

    def log_images(self, values, step=None, **kwargs):
        self.calls.append(("log_images", values, step))

    def log_table(self, name, columns=None, data=None, step=None, **kwargs):
        self.calls.append(("log_table", name, columns, data, step))

    def log_image(self, image, name=None, step=None):  # comet_ml Experiment.log_image
        self.calls.append(("log_image", image, name, step))


def test_images_and_tables_reach_each_kind_of_tracker(monkeypatch):
    names = ("wandb", "clearml", "comet_ml", "mlflow", "dvclive")
    trackers = [_Recorder(n) for n in names]
    acc = types.SimpleNamespace(is_main_process=True, trackers=trackers)
    mlflow_calls = []
    fake_mlflow = types.SimpleNamespace(
        log_image=lambda image, key, step: mlflow_calls.append(("image", image, key, step)),
        log_table=lambda data, artifact_file: mlflow_calls.append(("table", data, artifact_file)),
    )
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow)
    images = torch.zeros(2, 3, 4, 5)
    images[1] = 1.0
    log_images(acc, "samples", images, step=7, nrow=2)
    wandb, clearml, comet, _, dvclive = trackers
    kind, values, step = wandb.calls[0]
    assert step == 7 and [im.shape for im in values["samples"]] == [(4, 5, 3)] * 2
    assert values["samples"][1].dtype == np.uint8 and values["samples"][1].max() == 255
    grid = clearml.calls[0][1]["samples"]
    assert grid.shape == (4 + 4, 2 * 5 + 6, 3) and grid.dtype == np.uint8  # make_grid: 2-pixel padding
    assert comet.calls[0][0] == "log_image" and comet.calls[0][2:] == ("samples", 7)
    assert mlflow_calls[0][2:] == ("samples", 7) and mlflow_calls[0][1].shape == grid.shape
    assert dvclive.calls == []  # no image API: warned, not called
    log_table(acc, "eval/x", ["scope", "v"], [["all", 1.0]], step=7)
    assert wandb.calls[-1] == ("log_table", "eval/x", ["scope", "v"], [["all", 1.0]], 7)
    assert clearml.calls[-1][0] == "log_table"
    assert mlflow_calls[-1] == ("table", {"scope": ["all"], "v": [1.0]}, "eval_x.json")


def test_nothing_is_sent_from_other_ranks():
    rec = _Recorder("wandb")
    acc = types.SimpleNamespace(is_main_process=False, trackers=[rec])
    log_images(acc, "x", torch.zeros(1, 3, 2, 2), 1)
    log_table(acc, "x", ["a"], [[1]], 1)
    assert rec.calls == []
