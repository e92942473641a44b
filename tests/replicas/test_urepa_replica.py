"""CI learning guard of the U-REPA replica (script/replicas/urepa.py --quick): random tiny assets, 20 steps.

A silent training bug (a head trained on the wrong tokens, a LoRA or head that never reaches the saved
checkpoint, a checkpoint that evaluation does not load) leaves the held-out numbers of the reloaded model at
those of the untrained one; these assertions then fail.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_replica(name: str):
    spec = importlib.util.spec_from_file_location(
        f"replica_{name}", REPO / "script" / "replicas" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_urepa_quick_mode_learns(tmp_path, tiny_assets):
    urepa = load_replica("urepa")
    out = tmp_path / "out"
    result = urepa.main(["--quick", "--out", str(out)])
    steps = urepa.QUICK.steps
    rows = {(r["arm"], r["step"]): r for r in result["rows"]}
    assert set(rows) == {(arm, step) for arm in urepa.QUICK_ARMS for step in (0, steps)}

    # The aligned head, reloaded from the saved EMA checkpoint, beats the untrained head on held-out digits by
    # a stated margin: held-out token loss (1 - cos to the DINO tokens) at most 0.97x the untrained one.
    start, end = rows[("urepa", 0)], rows[("urepa", steps)]
    assert end["heldout_token_loss"] < 0.97 * start["heldout_token_loss"], (start, end)
    # The saved LoRA reaches the evaluated U-Net: its held-out diffusion loss differs from the base model's.
    for arm in urepa.QUICK_ARMS:
        before, after = rows[(arm, 0)]["heldout_diffusion_loss"], rows[(arm, steps)]["heldout_diffusion_loss"]
        assert abs(after - before) > 1e-6, (arm, before, after)
    # Step 0 is the same base model in every arm (same held-out draws).
    assert rows[("urepa", 0)]["heldout_diffusion_loss"] == rows[("baseline", 0)]["heldout_diffusion_loss"]

    # The training log of the aligned run: the token loss falls by at least 3 % from the first logged window.
    log = {t["arm"]: t for t in result["training_log"]}
    assert log["urepa"]["last"]["loss_token"] < 0.97 * log["urepa"]["first"]["loss_token"], log["urepa"]
    assert log["baseline"]["last"]["loss_token"] == 0.0  # lambda 0 builds no head

    for name in ("results.json", "results.csv", "summary.md", "curves.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == result["rows"]
    assert "| U-REPA (lambda 0.8, w 3) | 0 |" in (out / "summary.md").read_text()
