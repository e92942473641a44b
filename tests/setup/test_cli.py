"""utils/cli.py: a user mistake ends with one message and exit code 2, a bug keeps its traceback; the
eval/ and preprocessing/ entry points check all their inputs before loading a model."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.cli import UserError, raise_if_problems, run_cli
from utils.weights import MissingWeightsError

REPO = Path(__file__).resolve().parents[2]


def _raises(exc):
    def main():
        raise exc

    return main


@pytest.mark.parametrize(
    "exc, expected",
    [
        (UserError("--image_dir /x does not exist"), "--image_dir /x does not exist"),
        (MissingWeightsError("VGG16 not found: run `hf download ...`"), "VGG16 not found"),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/a.csv"),
            "file not found: /data/a.csv",
        ),
    ],
)
def test_user_errors_exit_2_with_one_message(exc, expected, capsys, monkeypatch):
    monkeypatch.delenv("TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["tool.py"])
    with pytest.raises(SystemExit) as info:
        run_cli(_raises(exc))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("tool.py: error: ") and expected in err and "Traceback" not in err


def test_bugs_keep_their_traceback_and_traceback_env_shows_user_errors(monkeypatch):
    with pytest.raises(ZeroDivisionError):
        run_cli(_raises(ZeroDivisionError("a bug")))
    monkeypatch.setenv("TRACEBACK", "1")
    with pytest.raises(UserError):
        run_cli(_raises(UserError("shown with its traceback")))
    assert run_cli(lambda argv: argv, ["--x"]) == ["--x"]  # argv is passed through, the result returned


def test_raise_if_problems_lists_everything_or_keeps_a_single_exception():
    raise_if_problems([])
    with pytest.raises(UserError, match=r"cannot start: 2 problems:\n  - a\n  - b") as info:
        raise_if_problems(["a", MissingWeightsError("b")])
    assert isinstance(info.value, UserError)
    with pytest.raises(MissingWeightsError, match="only"):  # one caught exception keeps its own type
        raise_if_problems([MissingWeightsError("only")])
    with pytest.raises(UserError, match="cannot start: one"):
        raise_if_problems(["one"])


def test_ic_lpips_reports_all_missing_inputs_before_loading_vgg(tmp_path, monkeypatch):
    import eval.compute_ic_lpips as cil

    def no_vgg(*args, **kwargs):
        raise AssertionError("VGG must not be loaded when inputs are missing")

    monkeypatch.setattr(cil, "build_lpips_vgg", no_vgg)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no VGG16 in this cache either
    with pytest.raises(UserError) as info:
        cil.main(
            ["--image_dir", str(tmp_path / "gen" / "hazelnut" / "hole"), "--mvtec_root", str(tmp_path / "m")]
        )
    message = str(info.value)
    assert "3 problems" in message
    assert "generated image folder not found" in message and "MVTec AD root" in message and "VGG16" in message


def test_generate_reports_model_and_weights_together(tmp_path):
    from eval.generate import main

    with pytest.raises(UserError) as info:
        main(
            [
                "stage2",
                "--pretrained_model_name_or_path",
                str(tmp_path / "sd15"),
                "--weights_dir",
                str(tmp_path / "w"),
                "--mvtec_name",
                "hazelnut",
                "--mvtec_anomaly_name",
                "hole",
            ]
        )
    message = str(info.value)
    assert "2 problems" in message and "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert "dual_config.json" in message


def test_evaluate_sd15_checks_inputs_first(tmp_path):
    from eval.evaluate_sd15 import main

    with pytest.raises(UserError) as info:
        main(
            [
                "--checkpoints",
                str(tmp_path / "run" / "checkpoint-5"),
                "--out_dir",
                str(tmp_path / "eval"),
                "--ref_dir",
                str(tmp_path / "val"),
                "--align_csv",
                str(tmp_path / "a.csv"),
            ]
        )
    message = str(info.value)
    for expected in (
        "checkpoint-5: no such checkpoint",
        "--ref_dir",
        "--align_csv",
        "--align_latent_dir is required",
    ):
        assert expected in message


def test_a_preprocessing_entry_point_exits_2_without_traceback(tmp_path):
    """The real process: exit code 2, both problems (CSV and weights) in one message, no traceback."""
    result = subprocess.run(
        [
            sys.executable,
            "preprocessing/build_caches.py",
            "--csv",
            str(tmp_path / "missing.csv"),
            "--latent_dir",
            str(tmp_path / "lat"),
            "--pretrained_model_name_or_path",
            str(tmp_path / "no_sd"),
        ],
        cwd=REPO,
        env={**os.environ, "TRACEBACK": ""},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    assert "build_caches.py: error: cannot start: 2 problems" in result.stderr
    assert "missing.csv" in result.stderr and "no_sd" in result.stderr and "Traceback" not in result.stderr
