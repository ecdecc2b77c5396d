"""The one shape function every backend uses: (component spec, profile) → per-tensor ranges."""
from __future__ import annotations

import pytest

from exporters.dims import ModelDims
from exporters.families.sd import component_specs
from exporters.profile import load_profile
from exporters.specs import dynamic_axes, shape_of, tensor_ranges
from runtime.errors import ProfileError, ShapeError
from runtime.shapes import bind_axes

SD21 = ModelDims(vae_scale_factor=8, size_multiple=64, latent_channels=4, unet_in_channels=4, text_hidden_size=1024,
                 max_tokens=77, vocab_size=49408, native_height=768, native_width=768)


def test_sd21_unet_ranges_double_the_batch_for_guidance():
    unet = component_specs(SD21)["unet"]
    ranges = tensor_ranges(unet, load_profile("sd21"), SD21)
    assert ranges["sample"] == {"min": [1, 4, 64, 64], "opt": [2, 4, 96, 96], "max": [8, 4, 128, 128]}
    assert ranges["encoder_hidden_states"]["max"] == [8, 77, 1024]
    assert ranges["timestep"]["opt"] == [2]


def test_vae_and_text_encoder_ranges():
    specs = component_specs(SD21)
    profile = load_profile("sd21")
    assert shape_of(specs["vae_decoder"], "images", profile, SD21)["max"] == [4, 3, 1024, 1024]
    assert shape_of(specs["vae_encoder"], "latent_parameters", profile, SD21)["min"] == [1, 8, 64, 64]
    assert shape_of(specs["text_encoder"], "input_ids", profile, SD21) == {"min": [1, 77], "opt": [1, 77], "max": [4, 77]}


def test_unknown_tensor_lists_valid_names():
    with pytest.raises(ProfileError, match="unet has no tensor 'latents'; "
                                           "valid names: sample, timestep, encoder_hidden_states, model_output"):
        shape_of(component_specs(SD21)["unet"], "latents", load_profile("sd21"), SD21)


def test_dynamic_axes_are_named():
    axes = dynamic_axes(component_specs(SD21)["vae_decoder"])
    assert axes == {"latent": {0: "batch", 2: "latent_height", 3: "latent_width"},
                    "images": {0: "batch", 2: "latent_height_x8", 3: "latent_width_x8"}}


def test_bind_axes_rejects_inconsistent_inputs():
    unet = component_specs(SD21)["unet"]
    dims = {t.name: t.dims for t in unet.inputs}
    assert bind_axes(dims, {"sample": (2, 4, 96, 64), "timestep": (2,), "encoder_hidden_states": (2, 77, 1024)}) == {
        "unet_batch": 2, "latent_height": 96, "latent_width": 64}
    with pytest.raises(ShapeError, match="axis 'unet_batch' is 3 here but 2"):
        bind_axes(dims, {"sample": (2, 4, 96, 64), "timestep": (3,), "encoder_hidden_states": (2, 77, 1024)})
    with pytest.raises(ShapeError, match=r"must have shape \['unet_batch', 77, 1024\]"):
        bind_axes(dims, {"sample": (2, 4, 96, 64), "timestep": (2,), "encoder_hidden_states": (2, 77, 768)})
    pixels = {"image": component_specs(SD21)["vae_encoder"].inputs[0].dims}
    with pytest.raises(ShapeError, match="must be a multiple of 8, got 100"):
        bind_axes(pixels, {"image": (1, 3, 100, 64)})


def test_calibration_feed_maps_a_unet_call_to_its_inputs():
    """The UNet spec's feed turns the bound arguments of a UNet2DConditionModel call (as diffusers
    pipelines make it, conditions included) into the graph's inputs by name."""
    import numpy as np
    import torch

    dims = ModelDims(**{**SD21.__dict__, "unet_conditions": (("timestep_cond", 8), ("text_embeds", 16), ("time_ids", 6))})
    unet = component_specs(dims)["unet"]
    call = {"sample": torch.ones(2, 4, 8, 8), "timestep": torch.tensor(7), "encoder_hidden_states": torch.zeros(2, 77, 1024),
            "timestep_cond": torch.full((2, 8), 3.0),
            "added_cond_kwargs": {"text_embeds": torch.full((2, 16), 4.0), "time_ids": torch.full((2, 6), 5.0)}}
    feed = unet.feed_from_call(call)
    assert list(feed) == [t.name for t in unet.inputs]
    assert feed["timestep"].tolist() == [7.0, 7.0] and feed["timestep"].dtype == np.float32
    assert feed["timestep_cond"].max() == 3.0 and feed["text_embeds"].max() == 4.0 and feed["time_ids"].max() == 5.0
