"""Run several trainers one after another inside ONE ``accelerate launch`` (tests/core/test_trainers_on_core.py).

    accelerate launch --multi_gpu --num_processes 2 tests/core/two_process_driver.py jobs.json

``jobs.json`` lists ``{"name", "script", "argv"}``; each trainer's ``main(argv)`` runs as the tests' in-process
runs call it (accelerate's state reset first), in the same two workers, so the interpreters, imports and the
process group are paid for once instead of once per trainer. The process group stays up from one trainer to
the next (``Accelerator.end_training`` would destroy it; creating the default gloo group again in the same
processes can pick up the old group's addresses from the launcher's store and fail to connect), and is
destroyed at the end. A trainer that raises leaves its traceback in ``<name>.error`` next to jobs.json and the
next one still runs. Run as a file: ``tests`` is not importable in a subprocess (torch-fidelity installs a
top-level package of that name).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path


def main(jobs_file: str) -> int:
    import torch.distributed
    from accelerate.state import AcceleratorState, GradientState, PartialState

    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: (
        None if group is None else destroy(self, group)
    )
    jobs_path = Path(jobs_file)
    failed = 0
    for job in json.loads(jobs_path.read_text()):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        try:
            spec = importlib.util.spec_from_file_location(f"ddp_test_{job['name']}", job["script"])
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            module.main(job["argv"])
        except BaseException:  # a CLI error's SystemExit too: recorded, and the next job runs
            failed += 1
            rank = os.environ.get("RANK", "?")
            error = jobs_path.with_name(f"{job['name']}.error")
            with open(error, "a") as f:
                f.write(f"rank {rank}:\n{traceback.format_exc()}\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
