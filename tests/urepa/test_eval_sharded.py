"""U-REPA evaluation across processes (eval/evaluate_sd15.py + eval/sharding.py) and the checkpoint watcher.

* ``accelerate launch --multi_gpu --num_processes 2`` on CPU writes the samples and per-batch Inception features a
  single process at the workers' torch thread count writes, byte for byte, and the same FID/sFID (computed once,
  from the union); the CPU thread count is part of the samples' folder key (kernels round differently at another);
* a run that dies mid-batch, run again, ends with the same samples and FID; features lost after their images were
  written are recomputed from the PNGs, equal to the in-memory ones;
* eval/watch_sd15.py evaluates each new checkpoint once (aligned and baseline runs), appending to one curve.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.workers import ACCELERATE_2, REPO, worker_env, worker_threads


@pytest.fixture(scope="module")
def tiny_runs(tiny_assets, tmp_path_factory):
    """Two tiny train_sd15.py runs (aligned, baseline), checkpoints at steps 1 and 2, and their prompt table."""
    from accelerate.state import AcceleratorState, GradientState

    import train_sd15
    from tests.urepa.fake_data import make_dataset

    root = tmp_path_factory.mktemp("urepa_runs")
    clip = root / "clip.pt"
    torch.save(make_dataset().clip_embeddings, clip)
    runs = {}
    for kind, coeff in (("aligned", "0.5"), ("baseline", "0.0")):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        runs[kind] = root / f"run_{kind}"
        train_sd15.main(
            [
                "--config", str(Path(__file__).with_name("tiny_test.yaml")),
                "--set", f"output_dir={runs[kind]}", f"model.pretrained={tiny_assets['sd15']}",
                "train.max_steps=2", "train.checkpointing_steps=1", f"data.clip_embeddings={clip}",
                f"loss.align_coeff={coeff}",
            ]
        )  # fmt: skip
    return runs


def eval_argv(tiny_assets, tmp_path: Path, out: Path) -> list[str]:
    return [
        "--out_dir", str(out), "--num_samples", "5", "--num_steps", "2", "--batch_size", "2",
        "--sampler", "ddpm", "--ref_dir", str(tiny_assets["imagenet"] / "ILSVRC/Data/CLS-LOC/val"),
        "--num_ref", "6", "--stats_cache", str(tmp_path / "stats"), "--inception_path", "random",
        "--grid_classes", "0", "1",
    ]  # fmt: skip


def samples(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/samples-*/*.png"))}


def features(out: Path) -> dict[str, dict[str, np.ndarray]]:
    found = {}
    for p in sorted(out.glob("*/samples-*/features-*/*.npz")):
        with np.load(p) as data:
            found[str(p.relative_to(out))] = {k: data[k] for k in data.files}
    return found


def same_features(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[f].keys() == b[f].keys() and all(np.array_equal(a[f][k], b[f][k]) for k in a[f]) for f in a
    )


def result(out: Path, run: Path, step: int = 2) -> dict:
    return json.loads((out / run.name / f"checkpoint-{step}.json").read_text())


def _subprocess_env(tmp_path: Path) -> dict[str, str]:
    """The workers' environment (tests/workers.py) with this test's fast matrix square root (tests/fast_sqrtm.py)
    in the subprocesses too: a sitecustomize that loads it by path (``import tests...`` would find
    torch-fidelity's top-level ``tests`` package there, and a failing sitecustomize only prints a line)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import importlib.util\nimport cleanfid.fid\n"
        f"spec = importlib.util.spec_from_file_location('fast_sqrtm', {str(REPO / 'tests' / 'fast_sqrtm.py')!r})\n"
        "module = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(module)\n"
        "cleanfid.fid.linalg.sqrtm = module.trace_preserving_sqrtm\n"
    )
    return worker_env(PYTHONPATH=f"{site}{os.pathsep}{REPO}")


def test_two_processes_write_what_one_writes_and_resume(
    tiny_runs, tiny_assets, tmp_path, fast_sqrtm, monkeypatch
):
    import eval.evaluate_sd15 as ev

    ckpt = tiny_runs["aligned"] / "checkpoint-2"
    two = tmp_path / "two"
    cmd = [*ACCELERATE_2, str(REPO / "eval" / "evaluate_sd15.py"), "--checkpoints", str(ckpt)]
    proc = subprocess.run(
        [*cmd, *eval_argv(tiny_assets, tmp_path, two)],
        cwd=REPO,
        env=_subprocess_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Error in sitecustomize" not in proc.stderr, proc.stderr[-3000:]
    assert len(samples(two)) == 5 and len(features(two)) == 3  # batches [0,1] [2,3] [4]

    one = tmp_path / "one"  # one process, uninterrupted, with the workers' thread count
    with worker_threads():
        ev.main(["--checkpoints", str(ckpt), *eval_argv(tiny_assets, tmp_path, one)])
    assert samples(one) == samples(two) and same_features(features(one), features(two))
    r1, r2 = result(one, ckpt.parent), result(two, ckpt.parent)
    assert (r1["fid"], r1["sfid"]) == (r2["fid"], r2["sfid"]) and np.isfinite(r1["fid"])

    # a run that dies while writing sample 3 (batch [2, 3] half written, no features for it)
    three = tmp_path / "three"
    original = ev._save_uint8_png

    def die_at_3(image, path):
        if path.name == "000003.png":
            raise KeyboardInterrupt
        original(image, path)

    with worker_threads():
        monkeypatch.setattr(ev, "_save_uint8_png", die_at_3)
        with pytest.raises(KeyboardInterrupt):
            ev.main(["--checkpoints", str(ckpt), *eval_argv(tiny_assets, tmp_path, three)])
        monkeypatch.setattr(ev, "_save_uint8_png", original)
        assert len(samples(three)) == 3 and len(features(three)) == 1
        ev.main(["--checkpoints", str(ckpt), *eval_argv(tiny_assets, tmp_path, three)])
        assert samples(three) == samples(one) and same_features(features(three), features(one))
        assert result(three, ckpt.parent)["fid"] == r1["fid"]
        assert not list(three.rglob(".*.tmp"))  # nothing partial left
        # features lost after the images were written: recomputed from the PNGs, equal to the in-memory ones
        lost = sorted(three.glob("*/samples-*/features-*/000002.npz"))[0]
        lost.unlink()
        ev.main(["--checkpoints", str(ckpt), *eval_argv(tiny_assets, tmp_path, three)])
        assert (
            same_features(features(three), features(one)) and result(three, ckpt.parent)["fid"] == r1["fid"]
        )


def test_sample_folder_key_holds_the_cpu_thread_count(tiny_assets, tmp_path):
    """A resume at another thread count on a CPU starts a new folder instead of mixing in samples that round
    differently; on a GPU the count does not enter the key."""
    from types import SimpleNamespace

    import eval.evaluate_sd15 as ev

    lm = SimpleNamespace(ckpt=tmp_path / "run" / "checkpoint-2", step=2)
    args = ev.parse_args([*eval_argv(tiny_assets, tmp_path, tmp_path / "out"), "--checkpoints", "x"])
    folders, before = {}, torch.get_num_threads()
    try:
        for device in ("cpu", "cuda"):
            args.device = device
            for n in (1, 2):
                torch.set_num_threads(n)
                folders[device, n] = ev.sample_folder(lm, args, tmp_path)
    finally:
        torch.set_num_threads(before)
    assert folders["cpu", 1] != folders["cpu", 2] and folders["cuda", 1] == folders["cuda", 2]
    assert folders["cpu", 1].parent == folders["cuda", 1].parent == tmp_path / "run"


def test_watcher_evaluates_each_new_checkpoint_once(tiny_runs, tiny_assets, tmp_path, monkeypatch):
    from eval.watch_sd15 import main

    for key, value in _subprocess_env(tmp_path).items():  # the evaluations run as subprocesses
        monkeypatch.setenv(key, value)
    out = tmp_path / "curve"
    argv = ["--run_dir", str(tiny_runs["aligned"]), "--baseline_dir", str(tiny_runs["baseline"])]
    argv += ["--out_dir", str(out), "--every", "2", "--once", "--"]
    argv += eval_argv(tiny_assets, tmp_path, out)[2:]  # without its --out_dir
    argv[argv.index("--num_samples") + 1] = "2"
    (out / tiny_runs["aligned"].name).mkdir(parents=True)
    done = out / tiny_runs["aligned"].name / "checkpoint-2.json"  # as if evaluated at an earlier poll
    done.write_text(json.dumps({"run": "aligned:run_aligned", "step": 2, "fid": 1.0, "sfid": 1.0}))
    assert main(argv) == 1  # baseline step 2 only: steps 1 are not multiples of --every, aligned 2 is done
    assert json.loads(done.read_text())["fid"] == 1.0  # not evaluated again
    baseline = json.loads((out / tiny_runs["baseline"].name / "checkpoint-2.json").read_text())
    assert baseline["run"] == "baseline:run_baseline" and np.isfinite(baseline["fid"])
    assert not list(out.glob("*/checkpoint-1.json"))
    assert (out / "fid_vs_step.png").is_file()  # redrawn from both runs' results
    assert main(argv) == 0  # nothing new
