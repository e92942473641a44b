"""CI learning guard of the U-REPA replica (script/replicas/urepa.py --quick): random tiny assets, the replica's
two-level base U-Net pretrained for 30 steps, then 20 LoRA steps per arm.

A silent training bug (a base that is never trained or saved, a head trained on the wrong tokens, a LoRA or head
that never reaches the saved checkpoint, a checkpoint that evaluation does not load, a wrong diffusion target)
leaves the held-out numbers of the reloaded model at (or above) those of the untrained one; these assertions
then fail. Margins (stated in docs/replicas.md, U-REPA): base pretraining loss -20 %; held-out diffusion loss of
every fine-tuned U-Net below the base's (at most 0.999x); held-out token loss of the trained head at most 0.8x
the untrained head's; logged training token loss -20 %.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_replica(name: str):
    """The replica script as a module (script/ is a namespace package on the repo root)."""
    return importlib.import_module(f"script.replicas.{name}")


def test_urepa_quick_mode_learns(tmp_path, tiny_assets):
    urepa = load_replica("urepa")
    out = tmp_path / "out"
    result = urepa.main(["--quick", "--out", str(out), "--threads", "1"])
    steps = urepa.QUICK.steps
    rows = {(r["arm"], r["step"]): r for r in result["rows"]}
    assert set(rows) == {(arm, step) for arm in urepa.QUICK_ARMS for step in (0, steps)}

    # The base: a two-level U-Net whose aligned stage keeps a spatial grid, pretrained here (loss -20 %).
    base = json.loads((out / "work" / "base_sd15" / urepa.BASE_STAMP).read_text())
    assert base["unet"]["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert base["pretraining_loss"]["loss_last"] < 0.8 * base["pretraining_loss"]["loss_first"], base

    # Each arm's LoRA, reloaded from the saved EMA checkpoint, lowers the held-out diffusion loss of the base
    # (fixed noise and timesteps): a LoRA that never reaches the evaluated U-Net leaves it equal.
    for arm in urepa.QUICK_ARMS:
        before, after = rows[(arm, 0)]["heldout_diffusion_loss"], rows[(arm, steps)]["heldout_diffusion_loss"]
        assert after < 0.999 * before, (arm, before, after)
    # Step 0 is the same base model in every arm (same held-out draws).
    assert rows[("urepa", 0)]["heldout_diffusion_loss"] == rows[("baseline", 0)]["heldout_diffusion_loss"]
    assert rows[("urepa", 0)]["cknna"] == rows[("baseline", 0)]["cknna"]

    # The aligned head, reloaded from the checkpoint, beats the untrained head on held-out digits: held-out
    # token loss (1 - cos to the DINO tokens) at most 0.8x the untrained one.
    start, end = rows[("urepa", 0)], rows[("urepa", steps)]
    assert end["heldout_token_loss"] < 0.8 * start["heldout_token_loss"], (start, end)

    # The training log of the aligned run: the token loss falls by at least 20 % from the first logged window.
    log = {t["arm"]: t for t in result["training_log"]}
    assert log["urepa"]["last"]["loss_token"] < 0.8 * log["urepa"]["first"]["loss_token"], log["urepa"]
    assert log["baseline"]["last"]["loss_token"] == 0.0  # lambda 0 builds no head

    for name in ("results.json", "results.csv", "summary.md", "curves.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == result["rows"]
    assert "| U-REPA (lambda 0.8, w 3) | 0 |" in (out / "summary.md").read_text()

    # The cached base is found again by its key (a rerun does not pretrain it again).
    standin = Path(base["standin"])
    assert urepa.base_key(standin, out / "work" / "data" / "train.csv", urepa.QUICK) == base["key"]
