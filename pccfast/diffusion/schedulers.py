"""Schedulers by name, built from the checkpoint's own scheduler configuration.

``SCHEDULERS`` maps a ``--scheduler`` name to a diffusers scheduler class and the settings that
make it that sampler (e.g. ``dpm++-2m-karras``: DPM-Solver++ of order 2 with Karras sigmas).
:func:`make_scheduler` builds it with ``from_config`` from the pipeline's current scheduler, so
the training noise schedule (betas, prediction type, timestep spacing, offset) stays the
checkpoint's. :func:`unet_calls` counts the denoiser calls a run makes from the scheduler
itself (PNDM makes one call more than steps, Heun two per step but the last).
"""
from __future__ import annotations

import copy

__all__ = ["SCHEDULERS", "scheduler_names", "check_scheduler", "make_scheduler", "unet_calls"]

# name -> (diffusers class name, settings over the checkpoint's config)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++-2m-karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


def scheduler_names() -> list:
    """The accepted ``--scheduler`` names."""
    return list(SCHEDULERS)


def check_scheduler(name) -> None:
    """ValueError unless ``name`` is None (the checkpoint's own) or a known scheduler name."""
    if name is not None and name not in SCHEDULERS:
        raise ValueError(f"`scheduler` has to be one of {', '.join(SCHEDULERS)} (or none: the model's own) but is {name!r}")


def make_scheduler(name: str, base):
    """The scheduler ``name`` built from scheduler ``base``'s configuration (its noise schedule
    kept; settings the new class does not know are ignored by diffusers)."""
    check_scheduler(name)
    from pccfast.diffusion.quiet import quiet_imports

    with quiet_imports():
        import diffusers

    class_name, overrides = SCHEDULERS[name]
    config = dict(base.config)
    if class_name != type(base).__name__:  # the sampler's own defaults, not the old one's
        for key in ("algorithm_type", "solver_order", "use_karras_sigmas", "skip_prk_steps", "solver_type"):
            config.pop(key, None)
    return getattr(diffusers, class_name).from_config(config, **overrides)


def unet_calls(scheduler, steps: int, device=None) -> int:
    """Denoiser calls of a run with ``steps`` inference steps: the length of the scheduler's
    timesteps (the pipelines call the denoiser once per entry), set on a copy."""
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(steps, device=device)
    return len(sched.timesteps)
