"""The export side of the model families (design.md §8): a model folder's diffusers pipeline class
→ the Family that knows its components. One module per family defines FAMILY; this registry maps
pipeline classes to them, so that a new family touches no other family's module.

The runtime side (runtime/families/) assembles the engine pipeline of the same family name, and
owns which components each task needs."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters.dims import ModelDims
from exporters.specs import ComponentSpec
from runtime.errors import ModelSourceError

# the modules defining FAMILY, in the order their pipeline classes are listed to users
FAMILY_MODULES = ("exporters.families.sd", "exporters.families.lcm", "exporters.families.sdxl")
_REGISTERED: dict[str, Family] = {}


@dataclass(frozen=True)
class Family:
    """What exporting a family of diffusers pipelines needs.

    name: recorded as the manifest's `model.family`; the runtime family of that name loads it.
    pipeline_classes: the model_index.json `_class_name`s this family accepts.
    folder_components: the model folder's subfolders that must exist (and that the weights hash covers).
    components: the graphs it exports, in order (what `component_specs` returns, and what a
        profile's [precision] may name).
    denoiser: the component the scheduler loop calls every step: int8 calibrates it, classifier-free
        guidance doubles its batch.
    read_dims: model folder → ModelDims (shapes, and UNet features detected from its config).
    component_specs: ModelDims → {component: ComponentSpec}, with their tracing wrappers.
    load_pipeline: model folder → the PyTorch pipeline (fp32, eval).
    record_calibration: (pipe, denoiser spec, prompts, profile, steps, seed) → per prompt, the
        denoiser's real inputs while the pipeline denoises.
    assets: folders saved beside the graphs for the runtime (tokenizers, scheduler), from the pipeline.
    keep_fp32: model folder → the components its own configs say must not run in fp16 (SDXL's VAE
        with `force_upcast`); `--precision fp16` spares them as it spares the profile's.
    pipeline_config: model folder → the pipeline's own options (model_index.json) the runtime must
        construct it with (SDXL's force_zeros_for_empty_prompt), recorded as model.pipeline_config.
    """

    name: str
    pipeline_classes: tuple[str, ...]
    folder_components: tuple[str, ...]
    components: tuple[str, ...]
    denoiser: str
    read_dims: Callable[[Path], ModelDims]
    component_specs: Callable[[ModelDims], dict[str, ComponentSpec]]
    load_pipeline: Callable[[Path], Any]
    record_calibration: Callable[..., list]
    assets: tuple[str, ...] = ("tokenizer", "scheduler")
    keep_fp32: Callable[[Path], tuple[str, ...]] = lambda folder: ()
    pipeline_config: Callable[[Path], dict] = lambda folder: {}

    @property
    def tasks(self) -> Mapping[str, tuple[str, ...]]:
        """Task → components, as the runtime family of this name declares them (the quality pass
        runs the runtime's pipeline of the first task)."""
        from runtime import families

        return families.get(self.name).tasks


def register(family: Family) -> None:
    """Add (or replace) a family by name; for families defined outside this package."""
    _REGISTERED[family.name] = family


def all_families() -> list[Family]:
    found = {f.name: f for f in (importlib.import_module(m).FAMILY for m in FAMILY_MODULES)}
    return list({**found, **_REGISTERED}.values())


def known_components() -> set[str]:
    """Every component name some family exports, and the ControlNets' (what a profile may name
    before MODEL is resolved)."""
    from runtime.controlnet_names import MAX_CONTROLNETS, controlnet_names

    return {c for f in all_families() for c in f.components} | set(controlnet_names(MAX_CONTROLNETS))


def supported_pipelines() -> list[str]:
    return [c for f in all_families() for c in f.pipeline_classes]


def family_for(pipeline_class: str, source: str) -> Family:
    """The family that exports `pipeline_class`; an unsupported class names the supported ones."""
    for family in reversed(all_families()):  # registered families may take over a class
        if pipeline_class in family.pipeline_classes:
            return family
    raise ModelSourceError(
        f"{source} is a {pipeline_class}, which kiln does not support yet. "
        f"Supported pipeline classes: {', '.join(supported_pipelines())}"
    )


def get(name: str) -> Family:
    for family in all_families():
        if family.name == name:
            return family
    raise ModelSourceError(f"unknown model family {name!r}; known: {', '.join(f.name for f in all_families())}")
