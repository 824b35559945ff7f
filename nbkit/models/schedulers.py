"""Sampling schedulers by name, built from a model's scheduler config: swapping one never reloads the model
(`Scheduler.from_config(pipe.scheduler.config)`).

The `_karras` names are diffusers' own option `use_karras_sigmas=True`: the same solver, visiting noise levels
spaced as in Karras et al. 2022 (denser near the clean end), what web UIs call "DPM++ 2M Karras" and "Euler Karras".
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
SCHEDULERS = {
    "pndm": (PNDMScheduler, {}),  # SD's original default
    "ddim": (DDIMScheduler, {}),  # the course's pick for overfit models
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, DPMPP_2M),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {**DPMPP_2M, "use_karras_sigmas": True}),  # "DPM++ 2M Karras"
    "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),  # UniPC: a predictor-corrector multistep solver, good in 10-20 steps
}
ANCESTRAL = frozenset({"euler_a"})  # add fresh noise at every step: no single picture to converge to


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
