"""The runtime side of the model families: manifest `model.family` → the module that assembles its
pipeline. Family modules are imported on first use (they import diffusers), so this registry is
cheap to import; a new family is one module and one entry in FAMILY_MODULES (or `register`)."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import ArtifactError

CONTROLNETS = "controlnet_*"  # in a task's components: the ControlNets the caller picks (runtime/controlnet.py)

# family name → the module defining FAMILY (a RuntimeFamily)
FAMILY_MODULES: dict[str, str] = {"sd": "runtime.families.sd", "lcm": "runtime.families.lcm",
                                   "sdxl": "runtime.families.sdxl"}
_REGISTERED: dict[str, RuntimeFamily] = {}


@dataclass(frozen=True)
class RuntimeFamily:
    """What the runtime needs of a family.

    tasks: task name → the components (engines) it runs, e.g. text2img → text_encoder, unet, vae_decoder;
        the first task is the family's main one (what quality checks and benchmarks run).
    assemble: (task, manifest, engines) → the pipeline, a subclass of the family's diffusers class.
    denoiser: the component the scheduler loop calls every step (int8 calibrates it, guidance doubles it).
    assets: the folders beside the engines its pipeline loads (tokenizers, scheduler); every file
        in them must be listed in the manifest.
    request_defaults: what a service request leaves out (steps, guidance_scale) for this family.
    negative_prompt: whether its pipeline takes one (LCM's do not: no unconditional pass).
    schedulers: the scheduler classes its loop can run, where only some can (LCM's needs the
        denoised sample from step()); None: any that can drive the UNet (runtime/schedulers.py).
    request_fields: the optional ImageRequest fields its pipeline takes beyond SD's (SDXL:
        prompt_2, negative_prompt_2 and the size conditions); a request setting another is refused.
    """

    name: str
    tasks: Mapping[str, tuple[str, ...]]
    assemble: Callable[[str, Any, Mapping[str, Any]], Any]
    denoiser: str = "unet"
    assets: tuple[str, ...] = ("tokenizer", "scheduler")
    request_defaults: Mapping[str, Any] = field(default_factory=lambda: {"steps": 20, "guidance_scale": 7.5})
    negative_prompt: bool = True
    schedulers: tuple[str, ...] | None = None
    request_fields: tuple[str, ...] = ()

    def components(self, task: str, manifest=None, controlnets=None) -> tuple[str, ...]:
        """The components `task` runs; with a manifest, a ControlNet task's ControlNets are made
        concrete (runtime/controlnet.task_components: `controlnets`, else all the artifact has)."""
        if task not in self.tasks:
            raise ArtifactError(f"task must be one of {', '.join(self.tasks)} for {self.name} artifacts, got {task!r}")
        if manifest is None:
            return self.tasks[task]
        if CONTROLNETS not in self.tasks[task]:
            if controlnets is not None:
                raise ArtifactError(f"controlnets= applies to the ControlNet tasks "
                                    f"({', '.join(t for t in self.tasks if 'controlnet' in t) or 'none'}), not {task!r}")
            return self.tasks[task]
        from runtime.controlnet import task_components

        return task_components(self.tasks[task], manifest, controlnets)


def register(family: RuntimeFamily) -> None:
    """Add (or replace) a family by name; for families defined outside this package."""
    _REGISTERED[family.name] = family


def names() -> list[str]:
    return sorted(set(FAMILY_MODULES) | set(_REGISTERED))


def get(name: str) -> RuntimeFamily:
    """The runtime family recorded in a manifest; an unknown one names those this kiln knows."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in FAMILY_MODULES:
        raise ArtifactError(f"model family {name!r} is not one this runtime can load ({', '.join(names())}); "
                            "upgrade kiln or rebuild the artifact")
    from runtime.quiet import quiet

    with quiet("transformers"):  # diffusers' import makes transformers warn about image processors kiln never uses
        return importlib.import_module(FAMILY_MODULES[name]).FAMILY


def request_defaults(manifest) -> dict[str, Any]:
    """Steps and guidance for a request that leaves them out: what the artifact's profile
    recommends ([generation], e.g. SDXL Turbo's 1 step at guidance 0), else the family's."""
    defaults = dict(get(manifest.family).request_defaults)
    recommended = generation(manifest)
    for key in ("steps", "guidance_scale"):
        if recommended.get(key) is not None:
            defaults[key] = recommended[key]
    if recommended.get("guidance") is False:  # a UNet built for guidance off refuses more than 1
        defaults["guidance_scale"] = min(defaults["guidance_scale"], 1.0)
    return defaults


def generation(manifest) -> dict[str, Any]:
    """The [generation] table the artifact's profile recorded ({} for artifacts made before it)."""
    value = manifest.profile.get("generation") if isinstance(manifest.profile, Mapping) else None
    return dict(value) if isinstance(value, Mapping) else {}

