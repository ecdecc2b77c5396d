"""Scheduler names for the CLI and services: short names → diffusers scheduler classes and options."""
from __future__ import annotations

import inspect
from typing import Any

from runtime.errors import SchedulerError

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # as SD's own PNDM config: any step count
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                       "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),  # for latent consistency models (their UNet takes a guidance embedding)
}


def scheduler_from_name(name: str, config, allowed: tuple[str, ...] | None = None):
    """A scheduler of kind `name` (short name or diffusers class name) built from `config`, the
    model's own scheduler config, exactly as `X.from_config(pipe.scheduler.config)` does; refused,
    before any work, when it cannot drive this model's discrete-time UNet, or is not one of the
    classes in `allowed` (the family's `schedulers`, where its loop runs only some)."""
    import diffusers

    class_name, overrides = SCHEDULERS.get(name, (name, {}))
    if allowed is not None and class_name not in allowed and getattr(diffusers, class_name, None) is not None:
        names = [short for short, (cls_name, _) in SCHEDULERS.items() if cls_name in allowed] or list(allowed)
        raise SchedulerError(f"{class_name} cannot run this model's loop, which needs {' or '.join(allowed)} "
                             f"(its pipeline family runs only those); use {', '.join(names)}")
    cls = getattr(diffusers, class_name, None)
    backends = getattr(cls, "_backends", None)  # diffusers' stand-in for a class whose package is missing
    if backends:
        import importlib.util

        backends = [b for b in backends if importlib.util.find_spec(b) is None] or list(backends)
        raise SchedulerError(f"{class_name} needs {', '.join(backends)}, which is not installed here "
                             f"(pip install {' '.join(backends)}); or use one of {', '.join(SCHEDULERS)}")
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise SchedulerError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)} "
                             "or a diffusers scheduler class name")
    from runtime.quiet import quiet

    try:
        with quiet("diffusers"):  # "config attributes ... were passed to X, but are not expected": not the user's business
            scheduler = cls.from_config(config, **overrides)
    except Exception as exc:  # a scheduler that cannot take this model's config at all
        raise SchedulerError(f"{class_name} cannot be built from this model's scheduler config "
                             f"({type(exc).__name__}: {exc}); use one of {', '.join(SCHEDULERS)}") from exc
    with quiet("diffusers"):  # the probes' own notices (e.g. lower_order_final) are not the user's business
        why = _cannot_drive_unet(scheduler, config)
    if why:
        raise SchedulerError(f"{class_name} cannot drive this model: {why}. Use one of {', '.join(SCHEDULERS)}")
    return scheduler


def _cannot_drive_unet(scheduler, config) -> str | None:
    """Why `scheduler` cannot run the denoising loop of a UNet trained on discrete timesteps, or None."""
    import copy

    missing = [a for a in ("init_noise_sigma", "scale_model_input", "step", "set_timesteps", "order")
               if not hasattr(scheduler, a)]
    if missing:
        return f"it has no {', '.join(missing)} (a flow-matching or other scheduler for another kind of model)"
    required = [n for n, p in list(inspect.signature(scheduler.step).parameters.items())[3:]
                if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        return f"its step() needs {', '.join(required)}, which a text-to-image loop does not give it"
    wanted = config.get("prediction_type", "epsilon")
    takes_type = "prediction_type" in inspect.signature(type(scheduler).__init__).parameters
    if (wanted != "epsilon" and not takes_type) or scheduler.config.get("prediction_type", "epsilon") != wanted:
        return f"it does not take {wanted!r} predictions, which this model makes"
    limit = config.get("num_train_timesteps", 1000)
    for count in (1, 4):
        probe = copy.deepcopy(scheduler)
        try:
            probe.set_timesteps(count)
            steps = [float(t) for t in probe.timesteps]
        except Exception as exc:  # noqa: BLE001 - any failure here means it cannot run the loop
            return f"it cannot set {count} steps ({type(exc).__name__}: {exc})"
        if not all(0 <= t < limit for t in steps):
            return f"its timesteps ({steps[0]:.3g}...) are not the UNet's 0..{limit - 1} (it needs a model trained for them)"
        if steps != sorted(steps, reverse=True):
            return "its timesteps run from clean to noisy (an inversion scheduler, not one that generates)"
    return None
