"""SDXL and SDXL Turbo: engines from the tiny SDXL-shaped built-ins match diffusers' own SDXL
pipelines (text-to-image with prompt_2 and the size conditions, img2img, Turbo at 1 and 4 steps),
and what the artifact records about how the model is meant to run is enforced."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from exporters.builtin import ensure_builtin
from runtime import load_pipeline
from runtime.errors import RequestError

PIXEL_TOLERANCE = 2 / 255
SCHEDULERS = {"euler": EulerDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler}


def _reference(cls, model: str):
    pipe = cls.from_pretrained(ensure_builtin(model), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _engine(folder, task="text2img"):
    pipe = load_pipeline(folder, task=task)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_sdxl_text2img_matches_diffusers(tiny_sdxl_artifact, scheduler):
    engine, reference = _engine(tiny_sdxl_artifact), _reference(StableDiffusionXLPipeline, "tiny-sdxl")
    assert isinstance(engine, StableDiffusionXLPipeline)
    for pipe in (engine, reference):
        pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    # 64x192 is inside the profile (64..256) and not its opt (128x128); two prompts with two images
    # each, prompt_2 different from prompt, and the size conditions away from their defaults.
    kwargs = dict(prompt=["a red fox in the snow", "a lighthouse at dusk"], prompt_2=["watercolour", "oil on canvas"],
                  negative_prompt=["blurry", "low quality"], negative_prompt_2=["dark", "noisy"], height=64, width=192,
                  num_inference_steps=6, guidance_scale=5.0, num_images_per_prompt=2, original_size=(512, 384),
                  crops_coords_top_left=(16, 8), target_size=(64, 192), output_type="np")
    got = engine(generator=torch.Generator().manual_seed(7), **kwargs).images
    want = reference(generator=torch.Generator().manual_seed(7), **kwargs).images
    assert got.shape == want.shape == (4, 64, 192, 3)
    assert want.std() > 0.05, "reference images are flat; the comparison would prove nothing"
    assert np.abs(got - want).max() <= PIXEL_TOLERANCE
    # prompt_2 reaches the second text encoder (the last columns of the text, and the pooled embedding)
    embeds = [engine.encode_prompt("a fox", prompt_2=p, do_classifier_free_guidance=False) for p in ("ink", "pencil")]
    want_embeds = reference.encode_prompt("a fox", prompt_2="ink", do_classifier_free_guidance=False)
    width_1 = engine.text_encoder.config.hidden_size
    assert torch.allclose(embeds[0][0], want_embeds[0], atol=1e-4) and torch.allclose(embeds[0][2], want_embeds[2], atol=1e-4)
    assert torch.equal(embeds[0][0][..., :width_1], embeds[1][0][..., :width_1])
    assert (embeds[0][0][..., width_1:] - embeds[1][0][..., width_1:]).abs().max() > 1e-2
    assert (embeds[0][2] - embeds[1][2]).abs().max() > 1e-2


def test_sdxl_img2img_matches_diffusers(tiny_sdxl_artifact):
    engine = _engine(tiny_sdxl_artifact, "img2img")
    reference = _reference(StableDiffusionXLImg2ImgPipeline, "tiny-sdxl")
    assert isinstance(engine, StableDiffusionXLImg2ImgPipeline)
    pixels = np.random.default_rng(0).integers(0, 256, size=(96, 160, 3), dtype=np.uint8)
    kwargs = dict(prompt=["an oil painting of a harbour", "a castle"], prompt_2=["at night", "in fog"],
                  image=Image.fromarray(pixels), strength=0.6, num_inference_steps=10, guidance_scale=5.0,
                  num_images_per_prompt=2, negative_original_size=(256, 256), denoising_end=0.9, output_type="np")
    got = engine(generator=torch.Generator().manual_seed(11), **kwargs).images
    want = reference(generator=torch.Generator().manual_seed(11), **kwargs).images
    assert got.shape == want.shape == (4, 96, 160, 3)
    assert np.abs(got - want).max() <= PIXEL_TOLERANCE


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_turbo_matches_diffusers(tiny_sdxl_turbo_artifact, steps):
    engine, reference = _engine(tiny_sdxl_turbo_artifact), _reference(StableDiffusionXLPipeline, "tiny-sdxl-turbo")
    # the profile's scheduler (Euler ancestral, trailing timesteps) is the one in the artifact
    assert isinstance(engine.scheduler, EulerAncestralDiscreteScheduler)
    assert engine.scheduler.config.timestep_spacing == "trailing"
    reference.scheduler = EulerAncestralDiscreteScheduler.from_config(reference.scheduler.config,
                                                                      timestep_spacing="trailing")
    kwargs = dict(prompt=["a red fox", "a lighthouse"], height=128, width=64, num_inference_steps=steps,
                  guidance_scale=0.0, num_images_per_prompt=2, output_type="np")
    got = engine(generator=torch.Generator().manual_seed(3), **kwargs).images
    want = reference(generator=torch.Generator().manual_seed(3), **kwargs).images
    assert got.shape == want.shape == (4, 128, 64, 3)
    assert want.std() > 0.05
    assert np.abs(got - want).max() <= PIXEL_TOLERANCE


def test_guidance_off_unet_refuses_guidance_and_warns_once_past_the_recommendation(tiny_sdxl_turbo_artifact, caplog):
    engine = _engine(tiny_sdxl_turbo_artifact)
    unet = engine.manifest.components["unet"]
    sample = next(t for t in unet.inputs if t.name == "sample")
    assert sample.max[0] == engine.manifest.shape_range("batch")[2]  # the UNet batch is the image batch: no doubling
    with pytest.raises(RequestError, match=r"guidance_scale 5.0 needs classifier-free guidance, but this artifact's "
                                           r"UNet was built for guidance off") as err:
        engine("a fox", guidance_scale=5.0, num_inference_steps=1, height=64, width=64)
    assert err.value.field == "guidance_scale"
    with caplog.at_level(logging.WARNING, logger="runtime.requests"):
        for _ in range(2):
            engine("a fox", guidance_scale=0.5, num_inference_steps=1, height=64, width=64, output_type="np")
    warnings = [r for r in caplog.records if "above the 0 this model was made for" in r.getMessage()]
    assert len(warnings) == 1


def test_sdxl_manifest_records_the_family_pipeline_config_and_recommendation(tiny_sdxl_artifact,
                                                                              tiny_sdxl_turbo_artifact):
    from runtime import families

    xl = _engine(tiny_sdxl_artifact).manifest
    assert xl.family == "sdxl" and xl.model["pipeline_config"] == {"force_zeros_for_empty_prompt": True}
    assert set(xl.components) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert [t.name for t in xl.components["text_encoder_2"].outputs] == ["text_embeds", "hidden_states"]
    assert [t.name for t in xl.components["unet"].inputs][3:] == ["text_embeds", "time_ids"]
    assert (xl.folder / "tokenizer_2" / "tokenizer_config.json").is_file()
    assert families.request_defaults(xl) == {"steps": 20, "guidance_scale": 5.0}
    turbo = _engine(tiny_sdxl_turbo_artifact).manifest
    assert families.request_defaults(turbo) == {"steps": 1, "guidance_scale": 0.0}


def test_clip_skip_is_refused_naming_the_layer_the_engines_have(tiny_sdxl_turbo_artifact):
    with pytest.raises(RequestError, match="hidden states of layer -2 only") as err:
        _engine(tiny_sdxl_turbo_artifact)("a fox", clip_skip=1, num_inference_steps=1, guidance_scale=0.0)
    assert err.value.field == "clip_skip"


def test_service_requests_carry_prompt_2_and_the_size_conditions(tiny_sdxl_turbo_artifact, tiny_artifact):
    """The HTTP/Ray body and the batcher take SDXL's fields for SDXL artifacts (one engine call for
    the batch equals the direct pipeline call) and refuse them for a family that has none."""
    from pydantic import ValidationError

    from runtime.api import image_request_model
    from runtime.batcher import ImageRequest, generate_images, normalize_request

    pipe = _engine(tiny_sdxl_turbo_artifact)
    body = image_request_model(pipe.manifest)(prompt="a fox", prompt_2="ink", original_size=[256, 256],
                                              crops_coords_top_left=[8, 0], height=64, width=64)
    first = body.to_request()
    second = ImageRequest("a cat", height=64, width=64, original_size=(256, 256), crops_coords_top_left=(8, 0), seed=2)
    images = generate_images(pipe, [first, second], dict(pipe.scheduler.config))
    direct = pipe(prompt=["a fox", "a cat"], prompt_2=["ink", "a cat"], height=64, width=64, num_inference_steps=1,
                  guidance_scale=0.0, original_size=(256, 256), crops_coords_top_left=(8, 0),
                  generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(2)]).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, direct))
    with pytest.raises(ValidationError, match="original_size is \\(height, width\\) in pixels"):
        image_request_model(pipe.manifest)(prompt="a", original_size=[0, 64])
    sd = load_pipeline(tiny_artifact)
    with pytest.raises(ValidationError, match="prompt_2"):
        image_request_model(sd.manifest)(prompt="a", prompt_2="b")
    with pytest.raises(RequestError, match=r"this model \(sd\) takes no prompt_2") as err:
        normalize_request(sd, ImageRequest("a", prompt_2="b"))
    assert err.value.field == "prompt_2"
