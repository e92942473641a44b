"""One factory for the inference samplers of every system (anomaly generation, validation, U-REPA).

Each sampler is a diffusers scheduler built from the model's own scheduler config (betas, timestep
spacing, offsets), so that a sampler only changes how the reverse process is integrated:

* ``ddim``: :class:`~diffusers.DDIMScheduler` (eta 0);
* ``dpmsolver++``: :class:`~diffusers.DPMSolverMultistepScheduler`, DPM-Solver++ of order 2;
* ``pndm``: :class:`~diffusers.PNDMScheduler` with ``skip_prk_steps=True``: the scheduler SD-1.5 ships
  with (its ``scheduler_config.json``) and so the one the stock ``StableDiffusionPipeline`` - and
  DualAnoDiff's inference script - samples with;
* ``ddpm``: :class:`~diffusers.DDPMScheduler`, ancestral sampling (usually run with 250 respaced steps).

``prediction_type`` ("epsilon" / "v_prediction"), when given, overrides the config's: a model trained on
another target than its base config says needs it to turn outputs into x0.

x0 is never clipped (``clip_sample=False``): these are latent-diffusion models whose latents exceed [-1, 1].
SD-1.5's scheduler config has no ``clip_sample`` key, so diffusers' DDIM/DDPM default (True) would clip;
the stock ``StableDiffusionPipeline`` turns it off for the same reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SCHEDULERS = ("ddim", "dpmsolver++", "pndm", "ddpm")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def make_scheduler(kind: str, config: Mapping[str, Any], prediction_type: str | None = None):
    """A fresh diffusers scheduler of ``kind`` (one of :data:`SCHEDULERS`) from a scheduler ``config``."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; choose from {SCHEDULERS}")
    config = dict(config)
    config["clip_sample"] = False
    # from_config replaces the keys listed here by the new class's defaults: clip_sample must not be one.
    config["_use_default_values"] = [k for k in config.get("_use_default_values", []) if k != "clip_sample"]
    if prediction_type is not None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        config["prediction_type"] = prediction_type
    if kind == "ddim":
        return DDIMScheduler.from_config(config)
    if kind == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if kind == "pndm":
        # A DDPM config (what the trainers load) does not carry skip_prk_steps; SD-1.5's PNDM config sets it.
        return PNDMScheduler.from_config(config, skip_prk_steps=True)
    return DDPMScheduler.from_config(config)


def step_kwargs(scheduler: Any, generator: Any = None) -> dict[str, Any]:
    """Extra keyword arguments of ``scheduler.step``: the generator only where the scheduler takes one
    (DDPM/DDIM/DPM-Solver do, PNDM does not), as diffusers' pipelines pass it."""
    import inspect

    accepts = "generator" in inspect.signature(scheduler.step).parameters
    return {"generator": generator} if accepts and generator is not None else {}
