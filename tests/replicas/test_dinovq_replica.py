"""Learning guard for the DinoVQ replica (script/replicas/dinovq.py --quick): the repo's trainer, run on the
digits for a few dozen steps from the random tiny assets, must learn - a silent training bug (a loss that never
reaches the optimizer, a decoder that is never evaluated, an untrained checkpoint) fails here.

Margins (stated in docs/replicas.md, DinoVQ): the pixel reconstruction loss falls by at least 2x between the first
and the last logged step of every run; the held-out PSNR of every trained tokenizer beats the untrained one (same
seed) by at least 3 dB; with the DINO term, its loss falls by at least 10 %.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    module = importlib.import_module("script.replicas.dinovq")
    out = tmp_path_factory.mktemp("dinovq_quick")
    result = module.main(["--quick", "--seeds", "0", "--out", str(out), "--threads", "1"])
    result["out"] = out
    return result


def test_reconstruction_loss_falls(quick):
    for run in quick["runs"]:
        assert run["recon_loss_last"] < run["recon_loss_first"] / 2, run


def test_trained_psnr_beats_untrained(quick):
    untrained = quick["untrained"][0]["psnr"]
    for run in quick["runs"]:
        assert run["psnr"] > untrained + 3.0, (run["condition"], run["psnr"], untrained)


def test_dino_term_is_trained(quick):
    (run,) = [r for r in quick["runs"] if r["condition"] == "recon+dino"]
    assert run["dino_loss_last"] < 0.9 * run["dino_loss_first"], run


def test_outputs_written(quick):
    out = quick["out"]
    for name in ("results.json", "results.csv", "table.md", "learning_curves.png", "reconstructions.png"):
        assert (out / name).is_file(), name
    assert "recon+dino" in (out / "table.md").read_text()
