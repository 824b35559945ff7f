"""Sampling schedulers by name, built from a model's scheduler config: swapping one never reloads the model
(`Scheduler.from_config(pipe.scheduler.config)`)."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)

SCHEDULERS = {
    "pndm": (PNDMScheduler, {}),  # SD's original default
    "ddim": (DDIMScheduler, {}),  # the course's pick for overfit models
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def make_scheduler(name: str, config):
    """A sampling scheduler of the named kind, built from a model's scheduler config."""
    key = name.lower().replace("-", "_").replace("++", "pp").replace(" ", "_")
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls, extra = SCHEDULERS[key]
    return cls.from_config(config, **extra)


def set_scheduler(pipe, name: str):
    """Swap the pipeline's scheduler in place (no reload); returns the pipeline."""
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    return pipe
