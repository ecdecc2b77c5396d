"""One frozen spec per component: I/O names and dims, how to wrap it for tracing, sample inputs,
tolerance; and the one function that turns (spec, profile) into per-tensor (min, opt, max) shapes.

The specs themselves come from a model family (exporters/families/), built from the shared
component builders in exporters/components.py. Importing this module does not import torch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exporters.dims import ModelDims
from exporters.profile import Profile, Range
from runtime.errors import ProfileError
from runtime.shapes import Dim, eval_dims, parse_ratio


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[Dim, ...]
    sample: tuple[str, float, float] = ("normal", 0.0, 1.0)  # ("normal", mean, std) | ("uniform"|"int", lo, hi)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrap: Callable[[Any], Any]  # pipeline -> torch.nn.Module taking the inputs in order
    config_of: Callable[[Any], dict]  # pipeline -> the diffusers/transformers config the runtime shim carries
    atol: float
    rtol: float
    module: str = ""  # the pipeline attribute the graph is traced from ("unet", "vae", ...)
    # (bound arguments of a call of that module) -> {input name: numpy array}: what calibration records
    feed_from_call: Callable[[dict], dict] | None = None

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs


def axis_ranges(profile: Profile, dims: ModelDims, component: str | None = None) -> dict[str, Range]:
    """(min, opt, max) of every named axis under `profile` (for `component`: with its own
    [shapes.COMPONENT] sizes). The UNet batch doubles under classifier-free guidance
    (dims.guidance_batch: 1 for an LCM, which embeds its guidance) but keeps min = batch min, so
    guidance_scale <= 1 still fits."""
    f, g = dims.vae_scale_factor, dims.guidance_batch
    b, h, w = profile.shapes_of(component).values()
    return {
        "batch": b,
        "unet_batch": Range(b.min, g * b.opt, g * b.max),
        "latent_height": Range(h.min // f, h.opt // f, h.max // f),
        "latent_width": Range(w.min // f, w.opt // f, w.max // f),
    }


def tensor_ranges(spec: ComponentSpec, profile: Profile, dims: ModelDims) -> dict[str, dict[str, list[int]]]:
    """Per-tensor {"min","opt","max"} shapes of `spec` under `profile`, for every backend."""
    axes = axis_ranges(profile, dims, spec.name)
    return {
        t.name: {k: list(eval_dims(t.dims, {a: getattr(r, k) for a, r in axes.items()})) for k in ("min", "opt", "max")}
        for t in spec.tensors
    }


def shape_of(spec: ComponentSpec, tensor: str, profile: Profile, dims: ModelDims) -> dict[str, list[int]]:
    """Ranges of one tensor; an unknown name is an error listing the valid ones."""
    ranges = tensor_ranges(spec, profile, dims)
    if tensor not in ranges:
        raise ProfileError(f"{spec.name} has no tensor '{tensor}'; valid names: {', '.join(ranges)}")
    return ranges[tensor]


def dynamic_axes(spec: ComponentSpec) -> dict[str, dict[int, str]]:
    """torch.onnx dynamic_axes: every dimension that is an expression gets a name."""
    out = {}
    for t in spec.tensors:
        named = {}
        for i, dim in enumerate(t.dims):
            scale, axis, divisor = parse_ratio(dim)
            if axis is not None:
                named[i] = axis + (f"_x{scale}" if scale != 1 else "") + (f"_d{divisor}" if divisor != 1 else "")
        out[t.name] = named
    return out


def sample_inputs(spec: ComponentSpec, shapes: dict[str, list[int]], seed: int) -> dict[str, Any]:
    """Seeded numpy inputs of the given shapes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {}
    for t in spec.inputs:
        kind, a, b = t.sample
        shape = shapes[t.name]
        if kind == "int":
            out[t.name] = rng.integers(int(a), int(b), size=shape).astype(t.dtype)
        elif kind == "uniform":
            out[t.name] = rng.uniform(a, b, size=shape).astype(t.dtype)
        else:
            out[t.name] = rng.normal(a, b, size=shape).astype(t.dtype)
    return out
