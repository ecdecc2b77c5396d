"""One frozen spec per component: I/O names and dims, how to wrap it for tracing, sample inputs, tolerance.

Importing this module does not import torch; the wrappers and sample inputs import it when called.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from exporters.profile import Profile, Range
from exporters.source import ModelDims
from runtime.errors import ProfileError
from runtime.shapes import Dim, eval_dims, parse_dim


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

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs


def axis_ranges(profile: Profile, dims: ModelDims) -> dict[str, Range]:
    """(min, opt, max) of every named axis under `profile`. The UNet batch doubles under
    classifier-free guidance but keeps min = batch min, so guidance_scale <= 1 still fits."""
    f = dims.vae_scale_factor
    b, h, w = profile.batch, profile.height, profile.width
    return {
        "batch": b,
        "unet_batch": Range(b.min, 2 * b.opt, 2 * b.max),
        "latent_height": Range(h.min // f, h.opt // f, h.max // f),
        "latent_width": Range(w.min // f, w.opt // f, w.max // f),
    }


def tensor_ranges(spec: ComponentSpec, profile: Profile, dims: ModelDims) -> dict[str, dict[str, list[int]]]:
    """Per-tensor {"min","opt","max"} shapes of `spec` under `profile`, for every backend."""
    axes = axis_ranges(profile, dims)
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
            scale, axis = parse_dim(dim)
            if axis is not None:
                named[i] = axis if scale == 1 else f"{axis}_x{scale}"
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


# ---- wrappers: the exact module each graph is traced from -------------------------------------


def _wrap_text_encoder(pipe):
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, text_encoder):
            super().__init__()
            self.text_encoder = text_encoder

        def forward(self, input_ids):
            return self.text_encoder(input_ids.to(torch.int64), return_dict=False)[0]

    return TextEncoder(pipe.text_encoder).eval()


def _wrap_unet(pipe):
    import torch

    class UNet(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    return UNet(pipe.unet).eval()


def _wrap_vae_decoder(pipe):
    import torch

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decode(latent, return_dict=False)[0]

    return VaeDecoder(pipe.vae).eval()


def _wrap_vae_encoder(pipe):
    import torch

    class VaeEncoder(torch.nn.Module):
        """Returns the latent distribution's parameters (mean ‖ log-variance); the runtime
        samples from them with the caller's generator, as diffusers' img2img does."""

        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, image):
            return self.vae.encode(image).latent_dist.parameters

    return VaeEncoder(pipe.vae).eval()


def _config(attr: str) -> Callable[[Any], dict]:
    def config_of(pipe) -> dict:
        config = getattr(pipe, attr).config
        return config.to_dict() if hasattr(config, "to_dict") else dict(config)

    return config_of


def component_specs(dims: ModelDims) -> dict[str, ComponentSpec]:
    """The four component specs of a Stable Diffusion model with these dims."""
    c, z, hidden, tokens = dims.unet_in_channels, dims.latent_channels, dims.text_hidden_size, dims.max_tokens
    f = dims.vae_scale_factor
    latent = ("latent_height", "latent_width")
    pixels = (f"{f}*latent_height", f"{f}*latent_width")
    specs = [
        ComponentSpec(
            name="text_encoder",
            inputs=(TensorSpec("input_ids", "int32", ("batch", tokens), ("int", 0, dims.vocab_size)),),
            outputs=(TensorSpec("text_embeddings", "float32", ("batch", tokens, hidden)),),
            wrap=_wrap_text_encoder,
            config_of=_config("text_encoder"),
            atol=1e-4,
            rtol=1e-4,
        ),
        ComponentSpec(
            name="unet",
            inputs=(
                TensorSpec("sample", "float32", ("unet_batch", c, *latent)),
                TensorSpec("timestep", "float32", ("unet_batch",), ("uniform", 0.0, 999.0)),
                TensorSpec("encoder_hidden_states", "float32", ("unet_batch", tokens, hidden)),
            ),
            outputs=(TensorSpec("model_output", "float32", ("unet_batch", z, *latent)),),
            wrap=_wrap_unet,
            config_of=_config("unet"),
            atol=1e-4,
            rtol=1e-4,
        ),
        ComponentSpec(
            name="vae_decoder",
            inputs=(TensorSpec("latent", "float32", ("batch", z, *latent)),),
            outputs=(TensorSpec("images", "float32", ("batch", 3, *pixels)),),
            wrap=_wrap_vae_decoder,
            config_of=_config("vae"),
            atol=1e-4,
            rtol=5e-4,
        ),
        ComponentSpec(
            name="vae_encoder",
            inputs=(TensorSpec("image", "float32", ("batch", 3, *pixels), ("uniform", -1.0, 1.0)),),
            outputs=(TensorSpec("latent_parameters", "float32", ("batch", 2 * z, *latent)),),
            wrap=_wrap_vae_encoder,
            config_of=_config("vae"),
            atol=1e-4,
            rtol=5e-4,
        ),
    ]
    return {s.name: s for s in specs}
