"""Sharded generation (eval/sharding.py, eval/generate.py): N processes write the bytes 1 process writes, and a
killed job, resumed, ends with the same set of files.

* every sampler and both presets, stage 1 and stage 2: the shards of a 2-way split (``process_index`` 0 and 1 of
  2, run one after the other in this process) write byte-identical files to one process;
* ``accelerate launch --multi_gpu --num_processes 2`` on CPU (a gloo group) for stage 2: identical bytes;
* stage 1 under 2 processes killed (SIGKILL, no clean-up) once files exist, then resumed: the final set equals
  the uninterrupted one, byte for byte, with no partial file left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.workers import ACCELERATE_2, REPO, worker_env, worker_threads


@pytest.fixture(scope="module")
def dual_weights(tiny_assets, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from models.dual_lora import DualLoRAUNet, save_dual_weights

    torch.manual_seed(0)
    dual = DualLoRAUNet(UNet2DConditionModel.from_pretrained(tiny_assets["sd15"], subfolder="unet"), rank=2)
    with torch.no_grad():
        for p in dual.trainable_state_dict().values():
            p.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("stage2")
    save_dual_weights(dual, None, out)
    return out


@pytest.fixture(scope="module")
def lora_dir(tiny_assets, tmp_path_factory):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_assets["sd15"], subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("stage1") / "lora"
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet))
    return out


@pytest.fixture(scope="module")
def loaded(tiny_assets, dual_weights, lora_dir):
    """The models of both stages, loaded once for the in-process tests below."""
    import eval.generate as gen
    from models.dual_lora_io import load_dual_unet

    args = gen.parse_args(stage_argv("stage1", tiny_assets, lora_dir, Path("unused"), 1, "--device", "cpu"))
    return {
        "stage1": gen.load_stage1_pipeline(args),
        "stage2": load_dual_unet(tiny_assets["sd15"], dual_weights),
    }


def stage_argv(stage: str, tiny_assets, weights: Path, out: Path, num: int, *extra: str) -> list[str]:
    argv = [stage, "--pretrained_model_name_or_path", str(tiny_assets["sd15"]), "--mvtec_name", "hazelnut"]
    argv += ["--lora_dir", str(weights)] if stage == "stage1" else ["--weights_dir", str(weights)]
    argv += [] if stage == "stage1" else ["--mvtec_anomaly_name", "hole"]
    argv += [
        "--output_root",
        str(out),
        "--num_images",
        str(num),
        "--batch_size",
        "2",
        "--num_inference_steps",
        "2",
        "--resolution",
        "32",
    ]
    return argv + list(extra)


def files(root: Path) -> dict[str, bytes]:
    """The generated images by path. The set's manifest.json (eval/manifest.py) is left out: it records each
    invocation (time, flags such as --device), so it is not meant to be byte-identical across runs."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


class FakeShard:
    """What eval/sharding.py reads of accelerate's PartialState, for process ``index`` of ``count``."""

    def __init__(self, index: int, count: int):
        self.process_index, self.num_processes = index, count
        self.is_main_process = self.is_local_main_process = index == 0
        self.device = torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass


@pytest.mark.parametrize(
    ("stage", "flags"),
    [
        ("stage1", ["--preset", "fast"]),
        ("stage1", ["--scheduler", "ddpm"]),
        ("stage2", ["--preset", "fast"]),  # ddim
        ("stage2", ["--preset", "official"]),  # pndm
        ("stage2", ["--scheduler", "dpmsolver++"]),
        ("stage2", ["--scheduler", "ddpm"]),  # stochastic: step noise from each sample's generator
    ],
)
def test_two_shards_write_what_one_process_writes(
    stage, flags, tiny_assets, dual_weights, lora_dir, loaded, tmp_path, monkeypatch
):
    import eval.generate as gen
    import models.dual_lora_io
    from models.schedulers import make_scheduler

    def stage1_pipeline(args):  # loaded once per module; the sampler as the flags say
        loaded["stage1"].scheduler = make_scheduler(args.scheduler, loaded["stage1"].scheduler.config)
        return loaded["stage1"]

    monkeypatch.setattr(gen, "load_stage1_pipeline", stage1_pipeline)
    monkeypatch.setattr(models.dual_lora_io, "load_dual_unet", lambda *a, **k: loaded["stage2"])
    weights = lora_dir if stage == "stage1" else dual_weights
    run = gen.run_stage1 if stage == "stage1" else gen.run_stage2
    one, two = tmp_path / "one", tmp_path / "two"
    run(
        gen.parse_args(stage_argv(stage, tiny_assets, weights, one, 3, "--device", "cpu", *flags)),
        FakeShard(0, 1),
    )
    for rank in (1, 0):  # rank 1 first: its files do not depend on rank 0's
        args = gen.parse_args(stage_argv(stage, tiny_assets, weights, two, 3, "--device", "cpu", *flags))
        run(args, FakeShard(rank, 2))
    a, b = files(one), files(two)
    assert len(a) == 3 * (1 if stage == "stage1" else 3) and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    images = [v for k, v in a.items() if "/mask/" not in k]
    assert len(set(images)) == len(images)  # different indices, different images (masks may all be empty)


def _process_or_none(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _one_process(argv: list[str]) -> None:
    """The 1-process reference, in this process at the workers' thread count (tests/workers.py): CPU kernels
    round differently at another count, which is not what these tests compare."""
    import eval.generate as gen

    with worker_threads():
        gen.main([*argv, "--device", "cpu"])


def test_accelerate_two_processes_write_the_same_bytes(tiny_assets, dual_weights, tmp_path):

    argv = stage_argv("stage2", tiny_assets, dual_weights, tmp_path / "one", 5, "--scheduler", "ddpm")
    _one_process(argv)
    argv = stage_argv("stage2", tiny_assets, dual_weights, tmp_path / "two", 5, "--scheduler", "ddpm")
    proc = subprocess.run(
        [*ACCELERATE_2, str(REPO / "eval" / "generate.py"), *argv],
        cwd=REPO,
        env=worker_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = files(tmp_path / "one"), files(tmp_path / "two")
    assert len(a) == 15 and a == b


def test_killed_two_process_job_resumes_to_the_same_set(tiny_assets, lora_dir, tmp_path):

    num = 12
    _one_process(stage_argv("stage1", tiny_assets, lora_dir, tmp_path / "one", num))
    out = tmp_path / "two"
    cmd = [
        *ACCELERATE_2,
        str(REPO / "eval" / "generate.py"),
        *stage_argv("stage1", tiny_assets, lora_dir, out, num),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=worker_env(), stderr=subprocess.DEVNULL, start_new_session=True
    )
    folder = out / "hazelnut" / "full"
    deadline = time.monotonic() + 300
    while len(list(folder.glob("*.png"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    # the launcher and both workers, without any clean-up (the workers may sit in their own process groups)
    import psutil

    tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs([p for p in map(_process_or_none, tree[1:]) if p is not None], timeout=30)
    made = len(list(folder.glob("*.png")))
    assert 2 <= made < num, made
    (folder / ".0011.png.crash.tmp").mkdir()  # what a kill inside atomic_write leaves behind
    (folder / ".0011.png.crash.tmp" / "0011.png").write_bytes(b"partial")
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming: {made} of {num} already exist" in proc.stderr
    assert files(tmp_path / "one") == files(out)  # every index once, same bytes, no partial file left
