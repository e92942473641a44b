"""What the tests' worker processes run with, and the same settings for a reference run inside pytest.

PyTorch picks CPU kernels by its intra-op thread count (a 1x1 convolution runs oneDNN with several threads and
the native kernel with one; the channels-last GroupNorm splits its sums by thread), and numpy's BLAS sums
differently too, so a byte-for-byte comparison needs the same count on both sides: the subprocesses get
``OMP_NUM_THREADS=1``, an in-process reference runs inside :func:`worker_threads`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORKER_THREADS = 1

# two processes of one machine on CPU (a gloo group); port 0: a free one
ACCELERATE_2 = [
    str(Path(sys.executable).with_name("accelerate")),
    "launch",
    "--multi_gpu",
    "--num_processes",
    "2",
]
ACCELERATE_2 += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
ACCELERATE_2 += ["--main_process_port", "0"]


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a worker subprocess: one thread, offline hub, the repository importable."""
    env = dict(os.environ, OMP_NUM_THREADS=str(WORKER_THREADS), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


@contextmanager
def worker_threads() -> Iterator[None]:
    """This process at the workers' thread count: torch's intra-op threads and the BLAS/OpenMP pools numpy
    and torch load (threadpoolctl); restored afterwards."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(WORKER_THREADS)
    try:
        with threadpool_limits(limits=WORKER_THREADS):
            yield
    finally:
        torch.set_num_threads(before)
