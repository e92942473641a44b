"""train_sd15.py with its config schema (issue 12): lr 0 stays 0, misspelled keys and unregistered dataset
factories are errors before anything is built, registered factories are what data.factory can name."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from train.urepa.data import DATASET_FACTORIES, build_dataset, register_dataset_factory
from utils.config import ConfigError

CONFIG = str(Path(__file__).with_name("tiny_test.yaml"))


def _main(tmp_path: Path, tiny_assets, *overrides: str) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    import train_sd15

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    argv = [
        "--config",
        CONFIG,
        "--set",
        f"output_dir={tmp_path / 'run'}",
        f"model.pretrained={tiny_assets['sd15']}",
    ]
    return train_sd15.main([*argv, *overrides])


def test_lr_zero_trains_with_lr_zero(tmp_path, tiny_assets):
    logs = _main(tmp_path, tiny_assets, "optim.lr=0", "train.max_steps=2", "train.checkpointing_steps=2")
    assert logs["lr"] == 0.0
    state = load_file(str(tmp_path / "run/checkpoint-2/trainable_state.safetensors"))
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) == 0.0 for v in lora_b)  # zero-initialised, never updated


@pytest.mark.parametrize(
    "override,error,message",
    [
        ("train.batch_sise=2", KeyError, r"unknown key 'train.batch_sise'; did you mean 'train.batch_size'"),
        ("train.batch_size=four", ConfigError, r"train.batch_size: Input should be a valid integer"),
        (
            "data.factory=tests.urepa.fake_data:make_dataset",
            ConfigError,
            r"not a registered dataset factory.*'synthetic_aligned'",
        ),
        ("data.factory=synthetic_align", ConfigError, r"did you mean 'synthetic_aligned'"),
    ],
)
def test_bad_config_fails_before_anything_is_built(tmp_path, tiny_assets, override, error, message):
    with pytest.raises(error, match=message):
        _main(tmp_path, tiny_assets, override)
    assert not (tmp_path / "run").exists()


def test_registered_factories_only():
    calls = []

    def make(layers, n):
        calls.append((layers, n))
        return list(range(n))

    register_dataset_factory("test_only_list", make)
    try:
        assert build_dataset({"factory": "test_only_list", "factory_kwargs": {"n": 3}}, ("mid",), None) == [
            0,
            1,
            2,
        ]
        assert calls == [(("mid",), 3)]
        with pytest.raises(ValueError, match="already registered"):
            register_dataset_factory("test_only_list", lambda layers: None)
    finally:
        DATASET_FACTORIES.pop("test_only_list")
    with pytest.raises(ValueError, match="no longer imported"):
        build_dataset({"factory": "os:system", "factory_kwargs": {}}, ("mid",), None)
    with pytest.raises(ValueError, match="plain words"):
        register_dataset_factory("os:system", make)
