"""manifest.json next to generated sets (eval/generate.py) and the refusal to mix sets made by other weights."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
import torch

from eval.manifest import MANIFEST_NAME, MixedSetsError, check_sets, read_manifest, write_manifest


def _dual_weights(tiny_assets, out: Path, seed: int, defect: str = "hole") -> Path:
    from diffusers import UNet2DConditionModel

    from models.dual_lora import DualLoRAUNet, save_dual_weights

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(tiny_assets["sd15"], subfolder="unet")
    dual = DualLoRAUNet(unet, rank=2)
    with torch.no_grad():
        for p in dual.trainable_state_dict().values():
            p.normal_(0, 0.02)
    save_dual_weights(dual, None, out, extra={"mvtec_name": "hazelnut", "mvtec_anomaly_name": defect})
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generation_manifest_and_mixed_resume(tiny_assets, tmp_path):
    from eval.generate import main

    w1 = _dual_weights(tiny_assets, tmp_path / "w1", 0)
    w2 = _dual_weights(tiny_assets, tmp_path / "w2", 1)
    common = [
        "stage2", "--pretrained_model_name_or_path", str(tiny_assets["sd15"]), "--mvtec_name", "hazelnut",
        "--mvtec_anomaly_name", "hole", "--output_root", str(tmp_path / "gen"), "--num_inference_steps", "1",
        "--device", "cpu", "--preset", "official", "--seed", "10",
    ]  # fmt: skip
    out = main([*common, "--weights_dir", str(w1), "--num_images", "1"])
    m = json.loads((out / MANIFEST_NAME).read_text())
    files = {f["name"]: f["sha256"] for f in m["weights"]["files"]}
    assert files["dual_unet.safetensors"] == _sha(w1 / "dual_unet.safetensors")
    assert files["dual_config.json"] == _sha(w1 / "dual_config.json")
    assert m["weights"]["trained_for"] == {"class": "hazelnut", "defect": "hole"}
    assert (m["sampler"], m["steps"], m["guidance"], m["seeds"]) == ("pndm", 1, 2.5, [10, 10])
    assert m["prompts"] == {"blend": "a vfx with sks", "fg": "sks", "negative": ""}
    assert {c["name"] for c in m["base_model"]["configs"]} >= {"model_index.json", "unet/config.json"}
    assert m["flags"]["preset"] == "official" and m["flags"]["mask_sigma"] is not None
    assert re.fullmatch(r"[0-9a-f]{40}", m["repo"]["commit"])  # the tests run inside the repository
    assert m["mixed_weights"] is False and len(m["runs"]) == 1

    # same weights: resuming extends the runs
    main([*common, "--weights_dir", str(w1), "--num_images", "2"])
    m = read_manifest(out)
    assert len(m["runs"]) == 2 and m["seeds"] == [10, 11] and not m["mixed_weights"]
    # other weights: refused before anything is generated (exit code 2 from the command line)
    with pytest.raises(MixedSetsError, match="other weights"):
        main([*common, "--weights_dir", str(w2), "--num_images", "3"])
    assert not (out / "image" / "0002.png").exists()
    main([*common, "--weights_dir", str(w2), "--num_images", "3", "--allow_mixed_weights"])
    m = read_manifest(out)
    assert m["mixed_weights"] is True and m["earlier_weights"][0]["dir"] == str(w1.resolve())
    # a downstream step refuses the mixed set unless told otherwise
    with pytest.raises(MixedSetsError, match="2 sets of weights"):
        check_sets({"hole": out})
    assert check_sets({"hole": out}, allow_mixed=True)["hole"]["mixed_weights"]


def _fake_set(folder: Path, defect: str, trained_for: str, base_hash: str = "b0") -> Path:
    write_manifest(
        folder,
        {
            "kind": "generated_set",
            "class": "hazelnut",
            "defect": defect,
            "weights": {
                "dir": f"/w/{trained_for}",
                "fingerprint": trained_for,
                "trained_for": {"class": "hazelnut", "defect": trained_for},
            },
            "base_model": {
                "path": f"/sd/{base_hash}",
                "configs": [{"name": "model_index.json", "sha256": base_hash}],
            },
            "mixed_weights": False,
        },
    )
    return folder


def test_check_sets_refuses_wrong_defect_weights_and_base_models(tmp_path, caplog):
    ok = {
        "hole": _fake_set(tmp_path / "hole", "hole", "hole"),
        "crack": _fake_set(tmp_path / "crack", "crack", "crack"),
    }
    manifests = check_sets(ok)
    assert manifests["hole"]["defect"] == "hole"  # each defect type from its own weights: the normal case
    wrong = {**ok, "print": _fake_set(tmp_path / "print", "print", "hole")}
    with pytest.raises(MixedSetsError, match="trained for defect 'hole'"):
        check_sets(wrong)
    other_base = {**ok, "cut": _fake_set(tmp_path / "cut", "cut", "cut", base_hash="b1")}
    with pytest.raises(MixedSetsError, match="2 different base models"):
        check_sets(other_base)
    with caplog.at_level(logging.WARNING, logger="eval.manifest"):
        got = check_sets({**ok, "old": tmp_path / "no_manifest"})
    assert got["old"] is None


def test_bad_cli_exit_code(tmp_path, capsys):
    """The mixing refusal is a user error: one message, exit code 2."""
    from eval.manifest import ALLOW_FLAG
    from utils.cli import run_cli

    def main(argv):
        check_sets({"print": _fake_set(tmp_path / "print", "print", "hole")})

    with pytest.raises(SystemExit) as exc:
        run_cli(main, [])
    assert exc.value.code == 2
    assert ALLOW_FLAG in capsys.readouterr().err
