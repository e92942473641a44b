"""The top-level ``datasets/`` package must not break the Hugging Face stack for scripts run from the root.

Python puts the script's directory (or the cwd for ``-c``) first on ``sys.path``, so from the repo root
``import datasets`` finds ours. transformers/accelerate only import HF ``datasets`` when its *distribution
metadata* exists; these tests pin that behaviour down so a future dependency that pulls in HF datasets
shows up here rather than as a confusing import error in training.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import datasets, importlib.metadata as md
assert datasets.__file__.startswith(ROOT), datasets.__file__   # ours wins from the root
import transformers, diffusers, peft, accelerate
from accelerate.utils import is_datasets_available as acc_is_datasets_available
try:
    md.version("datasets"); hf_installed = True
except md.PackageNotFoundError:
    hf_installed = False
# accelerate decides by distribution metadata: HF datasets is absent, so it never imports ours by mistake.
assert not hf_installed and not acc_is_datasets_available()
# transformers decides by find_spec and sees ours; only its Trainer would touch it, and then gets a clear error.
import transformers.trainer  # noqa: F401  (imports `datasets` at module level when it thinks it exists)
try:
    datasets.Dataset
except AttributeError as err:
    assert "shadows Hugging Face" in str(err)
else:
    raise AssertionError("datasets.Dataset should not resolve to anything")
from transformers import CLIPTextConfig, CLIPTextModel
from diffusers import UNet2DConditionModel
from peft import LoraConfig, get_peft_model
import torch
te = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, max_position_embeddings=8))
te = get_peft_model(te, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
out = te(torch.zeros(1, 8, dtype=torch.long)).last_hidden_state
from accelerate import Accelerator
acc = Accelerator(cpu=True)
loader = acc.prepare(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(6.0)), batch_size=2))
assert sum(len(b[0]) for b in loader) == 6
print("OK", acc.num_processes, tuple(out.shape))
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_hf_stack_imports_from_root():
    code = f"ROOT = {str(ROOT)!r}\n" + PROBE
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK 1 (1, 8, 16)" in res.stdout


def test_accelerate_launch_from_root(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nROOT = {str(ROOT)!r}\n" + PROBE)
    launcher = Path(sys.executable).with_name("accelerate")
    res = subprocess.run(
        [str(launcher), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK 1" in res.stdout
