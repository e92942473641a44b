"""Config schemas (issue 12): every file key and override checked, typed values, defaults in one place."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from train.dinovq.config_schema import DinoVQConfig
from train.urepa.config_schema import LR_SCHEDULERS, URepaConfig
from utils.config import ConfigError, UnknownConfigKeyError, load_config, schema_keys

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml")) + [REPO / "tests/urepa/tiny_test.yaml"]
A = REPO / "configs/sd15_repa_A.yaml"


def _schema(path: Path):
    return DinoVQConfig if path.name.startswith("dinovq") else URepaConfig


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict) and k != "factory_kwargs":
            out |= _keys(v, f"{prefix}{k}.")
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates_and_gets_every_key(path):
    schema = _schema(path)
    cfg = load_config(path, schema=schema)
    assert _keys(cfg) == set(schema_keys(schema))


def _child(tmp_path: Path, text: str, base: Path = A) -> Path:
    path = tmp_path / "child.yaml"
    path.write_text(f"base: {base}\n{text}")
    return path


def test_misspelled_key_names_the_file_the_key_and_the_closest_valid_one(tmp_path):
    path = _child(tmp_path, "train:\n  batch_sise: 4\n  lr: 0.1\n")
    with pytest.raises(UnknownConfigKeyError) as err:
        load_config(path, schema=URepaConfig)
    msg = str(err.value)
    assert str(path) in msg
    assert "unknown key 'train.batch_sise'; did you mean 'train.batch_size'?" in msg
    assert "unknown key 'train.lr'; did you mean 'optim.lr'?" in msg  # the right name in another section
    # a misspelling in a base file names the base file
    bad_base = tmp_path / "base.yaml"
    bad_base.write_text(A.read_text().replace("  max_steps: 60000", "  max_step: 60000"))
    with pytest.raises(
        UnknownConfigKeyError,
        match=rf"{bad_base}:\n  - unknown key 'train.max_step'; did you mean 'train.max_steps'",
    ):
        load_config(_child(tmp_path, "seed: 1\n", base=bad_base), schema=URepaConfig)


def test_unknown_override_is_a_key_error_with_a_suggestion():
    with pytest.raises(
        KeyError,
        match=r"override 'train.batch_sise=3': unknown key 'train.batch_sise'; did you mean 'train.batch_size'",
    ):
        load_config(A, ["train.batch_sise=3"], schema=URepaConfig)
    with pytest.raises(KeyError, match=r"'train.batch_size' is a value, not a section"):
        load_config(A, ["train.batch_size.x=3"], schema=URepaConfig)
    # keys the file does not list are still settable; free-form mappings take any key
    cfg = load_config(A, ["train.stop_at_step=7", "data.factory_kwargs.n=3"], schema=URepaConfig)
    assert cfg["train"]["stop_at_step"] == 7 and cfg["data"]["factory_kwargs"] == {"n": 3}


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.batch_size=four", r"train.batch_size: Input should be a valid integer.*\(got 'four'\)"),
        ("train.batch_size=0", r"train.batch_size: Input should be greater than 0"),
        ("train.mixed_precision=fp32", r"train.mixed_precision: Input should be 'no', 'bf16' or 'fp16'"),
        ("optim.betas=[0.9]", r"optim.betas: List should have at least 2 items"),
        ("optim.lr=-1", r"optim.lr: Input should be greater than or equal to 0"),
        (
            "model.align_layers=[middle]",
            r"model.align_layers\[0\]: Input should be 'enc_last', 'mid' or 'dec_first'",
        ),
        ("data.cfg_dropout=1.5", r"data.cfg_dropout: Input should be less than or equal to 1"),
        ("data.csv=null", r"data: without data.factory the LMDB caches are read: set data.csv"),
    ],
)
def test_wrong_value_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(A, [override], schema=URepaConfig)


def test_lr_zero_is_taken_as_zero_and_null_resolved_in_the_schema(tmp_path):
    assert load_config(_child(tmp_path, "optim:\n  lr: 0\n"), schema=URepaConfig)["optim"]["lr"] == 0.0
    assert load_config(A, schema=URepaConfig)["optim"]["lr"] == 2e-4  # A.yaml: lr null, LoRA
    assert load_config(A, ["model.finetune=full"], schema=URepaConfig)["optim"]["lr"] == 1e-4
    assert (
        load_config(A, ["optim.lr=1e-4"], schema=URepaConfig)["optim"]["lr"] == 1e-4
    )  # "1e-4" read as a number
    dinovq = REPO / "configs/dinovq_fast.yaml"
    train = load_config(dinovq, ["train.lr=0", "train.disc_lr=null"], schema=DinoVQConfig)["train"]
    assert train["lr"] == 0.0 and train["disc_lr"] == 0.0  # disc_lr null -> lr
    assert load_config(dinovq, ["train.disc_lr=0"], schema=DinoVQConfig)["train"]["disc_lr"] == 0.0


def test_minimal_config_gets_the_schema_defaults(tmp_path):
    path = tmp_path / "min.yaml"
    path.write_text("output_dir: out\n")
    cfg = load_config(path, schema=URepaConfig)
    assert cfg["model"]["lora"]["alpha"] is None  # null -> rank; A.yaml spells out rank 32, alpha 32
    cfg["model"]["lora"]["alpha"] = 32
    assert cfg == load_config(
        A, ["output_dir=out"], schema=URepaConfig
    )  # otherwise A.yaml lists the defaults
    with pytest.raises(ConfigError, match=r"output_dir: Input should be a valid string \(got None\)"):
        load_config(A, ["output_dir=null"], schema=URepaConfig)
    path.write_text("seed: 3\n")
    with pytest.raises(ConfigError, match="output_dir: required, not set"):
        load_config(path, schema=URepaConfig)


def test_dinovq_model_defaults_are_the_models_own():
    from models.dinovq import DinoVQModel

    params = inspect.signature(DinoVQModel).parameters
    defaults = DinoVQConfig().model.model_dump()
    assert set(defaults) == set(params) - {"self", "perceptual_module"}
    for name, value in defaults.items():
        want = params[name].default
        if name == "dino_dim":
            assert value == "auto"  # resolved from the DINO targets by the trainer
        else:
            assert value == (list(want) if isinstance(want, tuple) else want), name


def test_dinovq_errors_name_the_key():
    fast = REPO / "configs/dinovq_fast.yaml"
    with pytest.raises(ConfigError, match=r"dino.variant: unknown DINOv2 variant 'vitb16'"):
        load_config(fast, ["dino.variant=vitb16"], schema=DinoVQConfig)
    with pytest.raises(ConfigError, match=r"dino.resolution: must be a multiple of 14"):
        load_config(fast, ["dino.resolution=100"], schema=DinoVQConfig)
    with pytest.raises(
        KeyError, match=r"unknown key 'model.codebook_sise'; did you mean 'model.codebook_size'"
    ):
        load_config(fast, ["model.codebook_sise=4"], schema=DinoVQConfig)


def test_schema_choices_exist_in_the_libraries():
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULERS) <= {t.value for t in SchedulerType}


def test_config_errors_are_user_errors_exit_2_under_run_cli(capsys, monkeypatch):
    """A misspelled key or a wrong value ends an entry point with its message and exit code 2 (no traceback)."""
    from utils.cli import run_cli

    monkeypatch.delenv("TRACEBACK", raising=False)
    for override, message in (
        ("train.batch_sise=3", "did you mean 'train.batch_size'"),
        ("train.batch_size=four", "train.batch_size: Input should be a valid integer"),
        ("train", "is not of the form KEY=VALUE"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda argv: load_config(A, argv, schema=URepaConfig), [override])
        assert exit_info.value.code == 2
        err = " ".join(capsys.readouterr().err.split())  # the message is wrapped at 110 columns
        assert message in err and "Traceback" not in err


def test_repeated_set_flags_are_all_kept():
    """Issue 21 R2: ``--set a=1 --set b=2`` kept only the last flag (a plain store with nargs="*")."""
    import argparse

    from utils.config import add_config_args

    parser = argparse.ArgumentParser()
    add_config_args(parser, default="x.yaml")
    args = parser.parse_args(["--set", "train.lr=1", "train.seed=2", "--set", "train.lr=3"])
    assert args.overrides == [
        "train.lr=1",
        "train.seed=2",
        "train.lr=3",
    ]  # the later train.lr wins when applied
    assert parser.parse_args([]).overrides == []
