"""Past one machine (docs/scaling.md): the accelerate configs load with accelerate's own loader, the launcher
scripts build the commands the docs describe, and a two-"node" run on CPU (two launchers on this machine, one
process each, the 2-node config) trains, checkpoints once, and resumes through the same launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.core.trainers import REPO, TRAINERS

CONFIGS = REPO / "configs" / "accelerate"
NODE = REPO / "script" / "slurm" / "accelerate_node.sh"
ARRAY = REPO / "script" / "slurm" / "build_caches_array.sbatch"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


@pytest.mark.parametrize(
    ("name", "distributed", "machines", "processes"),
    [
        ("1gpu", "NO", 1, 1),
        ("8gpu_ddp", "MULTI_GPU", 1, 8),
        ("2node_8gpu_ddp", "MULTI_GPU", 2, 16),
        ("cpu_2proc", "MULTI_GPU", 1, 2),
    ],
)
def test_accelerate_configs_load(name, distributed, machines, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert str(cfg.distributed_type).rsplit(".", 1)[-1] == distributed
    assert (cfg.num_machines, cfg.num_processes, cfg.machine_rank) == (machines, processes, 0)
    assert str(cfg.mixed_precision).rsplit(".", 1)[-1].lower() == "no"  # the trainers choose their precision
    assert not cfg.use_cpu and cfg.rdzv_backend == "static"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), ACCELERATE=ACCELERATE)
    env.update(extra)
    return env


def _dry(script: Path, args: list[str], **env: str) -> str:
    proc = subprocess.run(
        ["bash", str(script), *args], env=_env(DRY_RUN="1", **env), capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_node_launcher_reads_slurm():
    out = _dry(
        NODE,
        ["configs/accelerate/2node_8gpu_ddp.yaml", "train_sd15.py", "--config", "configs/sd15_repa_A.yaml"],
        SLURM_NNODES="2",
        SLURM_NODEID="1",
        SLURM_GPUS_ON_NODE="8",
        MAIN_PROCESS_IP="10.0.0.7",
        MAIN_PROCESS_PORT="23456",
    )
    expected = (
        "launch --config_file configs/accelerate/2node_8gpu_ddp.yaml --num_machines 2 --machine_rank 1 "
        "--num_processes 16 --main_process_ip 10.0.0.7 --main_process_port 23456 --multi_gpu train_sd15.py "
        "--config configs/sd15_repa_A.yaml"
    )
    assert expected in out
    # several nodes without a known main node is an error, not a silent 127.0.0.1
    proc = subprocess.run(
        ["bash", str(NODE), "configs/accelerate/2node_8gpu_ddp.yaml", "x.py"],
        env=_env(DRY_RUN="1", NNODES="2", PROCS_PER_NODE="1"),
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "MAIN_PROCESS_IP" in proc.stderr


def test_cache_array_gives_each_task_its_shard():
    out = _dry(
        ARRAY, ["--csv", "a.csv"], SLURM_ARRAY_TASK_ID="3", SLURM_ARRAY_TASK_MIN="0", SLURM_ARRAY_TASK_MAX="7"
    )
    assert "preprocessing/build_caches.py --num_shards 8 --shard_index 3 --no_progress --csv a.csv" in out
    out = _dry(
        ARRAY,
        [],
        SLURM_ARRAY_TASK_ID="0",
        SLURM_ARRAY_TASK_COUNT="4",
        BUILDER="preprocessing/build_dino_cache.py",
    )
    assert "preprocessing/build_dino_cache.py --num_shards 4 --shard_index 0" in out
    from preprocessing.build_caches import main as build_main  # the flags the array passes exist

    with pytest.raises(SystemExit) as err:
        build_main(["--help"])
    assert err.value.code == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _docs_cpu_block() -> str:
    text = (REPO / "docs" / "scaling.md").read_text()
    block = text.split("<!-- cpu-commands -->", 1)[1].split("<!-- /cpu-commands -->", 1)[0]
    return block.strip().removeprefix("```bash").removesuffix("```")


def _rows(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "losses.jsonl").read_text().splitlines()]


def test_docs_cpu_commands_run(tiny_assets, tmp_path):
    """docs/scaling.md's CPU commands, run as written (bash, from the repository root)."""
    env = _env(OUT=str(tmp_path), PORT=str(_free_port()))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python / accelerate of this env
    proc = subprocess.run(
        ["bash", "-e", "-c", _docs_cpu_block()],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    weights = TRAINERS["latent_head"].weights_file
    two_proc = tmp_path / "two_processes"
    assert _rows(two_proc) == [1, 2] and (two_proc / "checkpoint-2" / "random_states_1.pkl").is_file()
    nodes = tmp_path / "two_nodes"
    assert _rows(nodes) == [1, 2, 3], proc.stderr[-4000:]  # one writer; the resubmitted job continued
    ckpt = nodes / "checkpoint-3"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert (ckpt / weights).is_file() and not (nodes / "checkpoint-2").exists()  # limit 1
