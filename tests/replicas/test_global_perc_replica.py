"""CI learning guard of the GlobalPercLoss replica (script/replicas/global_perc.py --quick): random tiny assets.

Both autoencoder arms and the latent DINO head must beat their untrained starting point on held-out digits by
stated margins; a loss that does not reach the optimizer, or a head file that is not the trained one, fails here.
"""

from __future__ import annotations

import importlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_replica(name: str):
    """The replica script as a module (script/ is a namespace package on the repo root)."""
    return importlib.import_module(f"script.replicas.{name}")


def test_global_perc_quick_mode_learns(tmp_path, tiny_assets):
    gp = load_replica("global_perc")
    out = tmp_path / "out"
    result = gp.main(["--quick", "--out", str(out)])
    steps = gp.QUICK.ae_steps
    rows = {(r["arm"], r["step"]): r for r in result["ae_rows"]}
    for arm in gp.ARMS:
        start, end = rows[(arm, 0)], rows[(arm, steps)]
        # held-out PSNR up by >= 5 dB and DINO feature distance at most half of the untrained autoencoder's
        assert end["psnr"] > start["psnr"] + 5.0, (arm, start, end)
        assert end["dino_feature_distance"] < 0.5 * start["dino_feature_distance"], (arm, start, end)
    # both arms start from the same weights
    assert rows[("mse", 0)]["psnr"] == rows[("mse+gp", 0)]["psnr"]

    heads = {r["head"]: r for r in result["head_rows"]}
    trained, untrained = heads["trained"], heads["untrained"]
    # the distillation loss falls by at least 30 %, and the head file written by the trainer agrees with the
    # encoder on held-out digits far better than the untrained head
    assert trained["train_loss_last"] < 0.7 * trained["train_loss_first"], trained
    assert trained["token_mse"] < 0.6 * untrained["token_mse"], heads
    assert trained["token_cosine"] > untrained["token_cosine"] + 0.3, heads

    for name in ("results.json", "results.csv", "summary.md", "curves.png", "reconstructions.png"):
        assert (out / name).is_file(), name
