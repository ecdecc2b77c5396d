"""Images from load_pipeline(artifact) match diffusers' own pipeline on the same weights and seed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from exporters.builtin import ensure_builtin
from runtime import load_pipeline

PIXEL_TOLERANCE = 2 / 255
SCHEDULERS = {"ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler}


def _reference(cls, model: str):
    pipe = cls.from_pretrained(ensure_builtin(model), safety_checker=None, feature_extractor=None,
                               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _same_scheduler(scheduler_cls, *pipes):
    for pipe in pipes:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)


@pytest.mark.parametrize("model", ["tiny", "tiny-sd15"])
@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_text2img_matches_diffusers(artifacts, model, scheduler):
    engine = load_pipeline(artifacts[model])
    engine.set_progress_bar_config(disable=True)
    reference = _reference(StableDiffusionPipeline, model)
    _same_scheduler(SCHEDULERS[scheduler], engine, reference)
    # 64x192 is inside the profile (64..256) and not its opt (128x128); two prompts, two images each.
    kwargs = dict(prompt=["a red fox in the snow", "a lighthouse at dusk"], negative_prompt=["blurry", "low quality"],
                  height=64, width=192, num_inference_steps=8, guidance_scale=7.5, num_images_per_prompt=2,
                  output_type="np")
    got = engine(generator=torch.Generator().manual_seed(7), **kwargs).images
    want = reference(generator=torch.Generator().manual_seed(7), **kwargs).images
    assert got.shape == want.shape == (4, 64, 192, 3)
    assert want.std() > 0.05, "reference images are flat; the comparison would prove nothing"
    assert np.abs(got - want).max() <= PIXEL_TOLERANCE


@pytest.mark.parametrize("model", ["tiny", "tiny-sd15"])
def test_img2img_matches_diffusers(artifacts, model):
    engine = load_pipeline(artifacts[model], task="img2img")
    engine.set_progress_bar_config(disable=True)
    reference = _reference(StableDiffusionImg2ImgPipeline, model)
    _same_scheduler(DPMSolverMultistepScheduler, engine, reference)
    pixels = np.random.default_rng(0).integers(0, 256, size=(192, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    kwargs = dict(prompt="an oil painting of a harbour", image=image, strength=0.6, num_inference_steps=10,
                  guidance_scale=6.0, output_type="np")
    got = engine(generator=torch.Generator().manual_seed(11), **kwargs).images
    want = reference(generator=torch.Generator().manual_seed(11), **kwargs).images
    assert got.shape == want.shape == (1, 192, 64, 3)
    assert np.abs(got - want).max() <= PIXEL_TOLERANCE
    # The init image must matter: a different image gives a different result.
    other = engine(generator=torch.Generator().manual_seed(11), **{**kwargs, "image": Image.fromarray(255 - pixels)}).images
    assert np.abs(other - got).max() > 2 * PIXEL_TOLERANCE


def test_pipeline_is_a_diffusers_pipeline(tiny_artifact):
    pipe = load_pipeline(tiny_artifact)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    out = pipe("a cat", num_inference_steps=2, height=64, width=64)
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (64, 64)
    steps = []
    pipe("a cat", num_inference_steps=3, height=64, width=64,
         callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert steps == [0, 1, 2]
