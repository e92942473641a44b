"""script/bench/sampling_flops.py: the U-Net evaluations per sample that docs/scaling.md's GPU-hour table uses,
against hand counts of SD-1.5's timesteps and REPA's guidance interval."""

from __future__ import annotations

import importlib.util

from tests.core.trainers import REPO


def _module():
    spec = importlib.util.spec_from_file_location("sampling_flops", REPO / "script/bench/sampling_flops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unet_evaluations_per_sample_match_hand_counts():
    m = _module()
    # DDPM, 250 steps, "leading" spacing + steps_offset 1: t = 1, 5, ..., 997; CFG where t/1000 <= 0.7: t <= 697
    guided = len(range(1, 698, 4))
    assert guided == 175
    assert m.unet_evals("ddpm", 250, True, 0.0, 0.7) == 250 + guided
    assert m.unet_evals("ddpm", 250, True, 0.0, 1.0) == 500
    assert m.unet_evals("ddpm", 250, False) == 250
    # PNDM with skip_prk_steps (SD-1.5): PLMS repeats its first timestep, 101 evaluations for 100 steps
    assert m.unet_evals("pndm", 100, True) == 2 * 101
    assert m.unet_evals("ddim", 50, True) == 100


def test_jobs_are_samples_over_rate():
    m = _module()
    flops = {"unet_urepa_lora32": 1e12, "unet_stage1_lora4": 1e12, "dual_unet_pair": 2e12}
    flops |= {"vae_decode": 0.0, "inception_299": 0.0}
    table = m.rows(flops, peak=100.0, util=0.5)  # 50 TFLOP/s
    seed = table[0]
    assert seed["tflop"] == 425 and abs(seed["per_s"] - 50 / 425) < 1e-12
    fid10k = m.jobs(table)[0]
    assert abs(fid10k["gpu_hours"] - 10_000 / (50 / 425) / 3600) < 1e-9
    assert abs(fid10k["wall_h_8gpu"] * 8 - fid10k["gpu_hours"]) < 1e-9
