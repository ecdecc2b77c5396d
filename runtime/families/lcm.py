"""Latent consistency models on the runtime side: LatentConsistencyModel{,Img2Img}Pipeline
subclasses whose models are engines. The UNet's guidance embedding (`timestep_cond`) is an engine
input like any other; the pipeline computes it from guidance_scale, as diffusers does, and runs no
classifier-free guidance batch. Its loop needs a scheduler whose step() also returns the denoised
sample, so only LCMScheduler drives it."""
from __future__ import annotations

import functools

from diffusers import LatentConsistencyModelImg2ImgPipeline, LatentConsistencyModelPipeline

from runtime.errors import RequestError
from runtime.families import RuntimeFamily
from runtime.families.sd import TASKS, EngineImg2ImgPipeline, EnginePipeline, assemble_sd
from runtime.guards import EngineBacked
from runtime.manifest import Manifest
from runtime.requests import checked

NO_NEGATIVE_PROMPT = ("a latent consistency model takes no negative prompt: its guidance is an embedding of "
                      "guidance_scale, with no unconditional pass to steer away from; leave it out")


def without_negative_prompt(call):
    """LCM's pipelines take no negative prompt (their guidance is an embedding, with no unconditional
    pass): kiln's callers pass one to every family, so an empty one is dropped and any other refused."""

    @functools.wraps(call)
    def __call__(self, *args, negative_prompt=None, negative_prompt_embeds=None, **kwargs):
        given = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt or ())
        if any(given) or negative_prompt_embeds is not None:
            raise RequestError(NO_NEGATIVE_PROMPT, field="negative_prompt")
        return call(self, *args, **kwargs)

    return __call__


class EngineLCMPipeline(EngineBacked, LatentConsistencyModelPipeline):
    """LatentConsistencyModelPipeline whose text encoder, UNet and VAE are engines."""

    manifest: Manifest
    request_size = EnginePipeline.request_size
    __call__ = without_negative_prompt(checked(LatentConsistencyModelPipeline.__call__))


class EngineLCMImg2ImgPipeline(EngineBacked, LatentConsistencyModelImg2ImgPipeline):
    """LatentConsistencyModelImg2ImgPipeline whose models are engines; the image sets the size."""

    manifest: Manifest
    request_size = EngineImg2ImgPipeline.request_size
    __call__ = without_negative_prompt(checked(LatentConsistencyModelImg2ImgPipeline.__call__))


FAMILY = RuntimeFamily(
    name="lcm",
    tasks={task: TASKS[task] for task in ("text2img", "img2img")},  # diffusers has no LCM ControlNet pipeline
    assemble=assemble_sd({"text2img": EngineLCMPipeline, "img2img": EngineLCMImg2ImgPipeline}),
    request_defaults={"steps": 4, "guidance_scale": 8.5},  # diffusers' LCM defaults (the embedding gets 7.5)
    negative_prompt=False,
    schedulers=("LCMScheduler",),
)
