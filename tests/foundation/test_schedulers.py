"""The one sampler factory (models/schedulers.py) shared by anomaly generation, validation and U-REPA."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def ddpm_config(tiny_assets):
    from diffusers import DDPMScheduler

    # what the trainers and load_dual_unet hold: SD-1.5's scheduler_config.json read as a DDPMScheduler
    return DDPMScheduler.from_pretrained(tiny_assets["sd15"], subfolder="scheduler").config


def test_pndm_is_the_stock_sd15_scheduler(tiny_assets, ddpm_config):
    """pndm == the PNDMScheduler SD-1.5 ships with (what StableDiffusionPipeline and DualAnoDiff sample with)."""
    from diffusers import PNDMScheduler

    from models.schedulers import make_scheduler

    ours = make_scheduler("pndm", ddpm_config)
    stock = PNDMScheduler.from_pretrained(tiny_assets["sd15"], subfolder="scheduler")
    assert isinstance(ours, PNDMScheduler)
    for key, value in stock.config.items():
        if not key.startswith("_"):
            assert ours.config[key] == value, key
    ours.set_timesteps(100)
    stock.set_timesteps(100)
    assert torch.equal(ours.timesteps, stock.timesteps)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for t in stock.timesteps[:5]:
        torch.testing.assert_close(ours.step(eps, t, x).prev_sample, stock.step(eps, t, x).prev_sample)


def test_kinds_prediction_type_and_no_clipping(ddpm_config):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    from models.schedulers import make_scheduler, step_kwargs
    from train.urepa.sampling import make_scheduler as urepa_make_scheduler

    ddim = make_scheduler("ddim", ddpm_config)
    assert isinstance(ddim, DDIMScheduler) and ddim.config.clip_sample is False
    assert ddpm_config.clip_sample is True  # diffusers' DDPM default would clip SD latents to [-1, 1]
    dpm = make_scheduler("dpmsolver++", ddpm_config)
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    ddpm = make_scheduler("ddpm", ddpm_config, prediction_type="v_prediction")
    assert isinstance(ddpm, DDPMScheduler) and ddpm.config.prediction_type == "v_prediction"
    assert urepa_make_scheduler(ddpm_config, "ddim", "v").config.prediction_type == "v_prediction"
    g = torch.Generator()
    assert (
        step_kwargs(ddpm, g) == {"generator": g} and step_kwargs(make_scheduler("pndm", ddpm_config), g) == {}
    )
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("euler", ddpm_config)
    with pytest.raises(ValueError, match="prediction_type"):
        make_scheduler("ddim", ddpm_config, prediction_type="sample_x0")
