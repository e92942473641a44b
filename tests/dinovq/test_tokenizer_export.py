"""DinoVQ as a tokenizer: save_pretrained / from_pretrained (PyTorchModelHubMixin), codes in and out."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.dinovq import CONFIG_FILE, WEIGHTS_FILE, DinoVQModel
from utils.weights import MissingWeightsError

_spec = importlib.util.spec_from_file_location("dinovq_test_helpers", Path(__file__).parent / "helpers.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
tiny_model, batch = helpers.tiny_model, helpers.batch

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor")


def trained_tiny(tmp_path=None):
    model = tiny_model(use_gan=True, disc_start=0)
    imgs, gt = batch()
    model.compute_loss(imgs, gt)  # moves the EMA codebook away from its initial state
    return model, imgs


def test_save_and_load_round_trip_without_discriminator(tmp_path):
    model, imgs = trained_tiny()
    model.save_pretrained(tmp_path / "tok")
    weights = load_file(str(tmp_path / "tok" / WEIGHTS_FILE))
    assert weights and not any(k.startswith("loss_fn.") for k in weights)  # no discriminator in the export
    cfg = json.loads((tmp_path / "tok" / CONFIG_FILE).read_text())
    assert cfg["use_gan"] is False and cfg["codebook_size"] == 16 and cfg["img_size"] == [28, 28]

    loaded = DinoVQModel.from_pretrained(tmp_path / "tok")
    assert not loaded.training and all(not m.training for m in loaded.modules())
    assert loaded.loss_fn.discriminator is None
    theirs = loaded.state_dict()
    for k, v in model.tokenizer_state_dict().items():
        assert torch.equal(theirs[k], v), k
    model.eval()
    rec_a, idx_a = model.reconstruct(imgs)
    rec_b, idx_b = loaded.reconstruct(imgs)
    assert torch.equal(idx_a, idx_b) and torch.equal(rec_a, rec_b)


def test_from_pretrained_is_strict_and_fails_clearly(tmp_path):
    model, _ = trained_tiny()
    with pytest.raises(MissingWeightsError, match="does not exist"):
        DinoVQModel.from_pretrained(tmp_path / "nowhere")
    model.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / WEIGHTS_FILE).unlink()
    with pytest.raises(MissingWeightsError, match=WEIGHTS_FILE):
        DinoVQModel.from_pretrained(tmp_path / "tok")
    model.save_pretrained(tmp_path / "tok2")
    cfg_path = tmp_path / "tok2" / CONFIG_FILE
    cfg = json.loads(cfg_path.read_text())
    cfg["decoder_depth"] = 2  # weights of one block, config of two: strict loading must refuse
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="Missing key"):
        DinoVQModel.from_pretrained(tmp_path / "tok2")


def test_encode_code_decode_code_equals_reconstruction():
    model, imgs = trained_tiny()
    model.eval()
    codes = model.encode_code(imgs)
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.int64
    rec, idx = model.reconstruct(imgs)
    assert torch.equal(codes.flatten(1), idx)
    torch.testing.assert_close(model.decode_code(codes.to(torch.int16)), rec, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.decode_code(codes.flatten(1)), rec, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="integer"):
        model.decode_code(codes.float())
    with pytest.raises(ValueError, match="grid"):
        model.decode_code(codes[:, :2])
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        model.decode_code(codes + 16)


def test_encode_code_leaves_the_codebook_alone():
    model, imgs = trained_tiny()
    model.train()
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    model.encode_code(imgs)
    for k, v in model.quantizer.state_dict().items():
        assert torch.equal(v, before[k]), k
