"""Scheduler names for the CLI and services: short names → diffusers scheduler classes and options."""
from __future__ import annotations

from typing import Any

from runtime.errors import SchedulerError

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                       "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}


def scheduler_from_name(name: str, config):
    """A scheduler of kind `name` (short name or diffusers class name) built from `config`, the
    model's own scheduler config, exactly as `X.from_config(pipe.scheduler.config)` does."""
    import diffusers

    class_name, overrides = SCHEDULERS.get(name, (name, {}))
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise SchedulerError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)} "
                             "or a diffusers scheduler class name")
    return cls.from_config(config, **overrides)
