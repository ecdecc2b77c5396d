"""SDXL (and SDXL Turbo) on the runtime side: StableDiffusionXL{,Img2Img}Pipeline subclasses whose
two text encoders, UNet and VAE are engines. The text encoder engines return the penultimate
layer's hidden states (and the second its pooled projection), which is what SDXL's encode_prompt
reads; the UNet's added conditions (text_embeds, time_ids) are engine inputs like any other."""
from __future__ import annotations

from typing import Any

from diffusers import (
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from runtime.assets import load_scheduler, load_tokenizer
from runtime.controlnet import controlnet_module
from runtime.families import CONTROLNETS, RuntimeFamily
from runtime.families.sd import (
    EngineControlNetImg2ImgPipeline,
    EngineControlNetPipeline,
    EngineImg2ImgPipeline,
    EnginePipeline,
)
from runtime.guards import EngineBacked
from runtime.manifest import Manifest
from runtime.requests import checked
from runtime.shims import HiddenStatesShim, UNetShim, VaeShim

TEXT = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
TASKS = {"text2img": TEXT, "img2img": (*TEXT, "vae_encoder"), "controlnet": (*TEXT, CONTROLNETS),
         "controlnet_img2img": (*TEXT, "vae_encoder", CONTROLNETS)}
ASSETS = ("tokenizer", "tokenizer_2", "scheduler")
PIPELINE_OPTIONS = {"text2img": ("force_zeros_for_empty_prompt",),
                    "img2img": ("force_zeros_for_empty_prompt", "requires_aesthetics_score"),
                    "controlnet": ("force_zeros_for_empty_prompt",),
                    "controlnet_img2img": ("force_zeros_for_empty_prompt", "requires_aesthetics_score")}


class EngineXLPipeline(EngineBacked, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline whose text encoders, UNet and VAE are engines."""

    manifest: Manifest
    request_size = EnginePipeline.request_size
    __call__ = checked(StableDiffusionXLPipeline.__call__)


class EngineXLImg2ImgPipeline(EngineBacked, StableDiffusionXLImg2ImgPipeline):
    """StableDiffusionXLImg2ImgPipeline whose models are engines; the image sets the size."""

    manifest: Manifest
    request_size = EngineImg2ImgPipeline.request_size
    __call__ = checked(StableDiffusionXLImg2ImgPipeline.__call__)


class EngineXLControlNetPipeline(EngineBacked, StableDiffusionXLControlNetPipeline):
    """StableDiffusionXLControlNetPipeline whose text encoders, UNet, VAE and ControlNets are engines."""

    manifest: Manifest
    request_size = EngineControlNetPipeline.request_size
    __call__ = checked(StableDiffusionXLControlNetPipeline.__call__)


class EngineXLControlNetImg2ImgPipeline(EngineBacked, StableDiffusionXLControlNetImg2ImgPipeline):
    """StableDiffusionXLControlNetImg2ImgPipeline whose models are engines."""

    manifest: Manifest
    request_size = EngineControlNetImg2ImgPipeline.request_size
    __call__ = checked(StableDiffusionXLControlNetImg2ImgPipeline.__call__)


PIPELINES = {"text2img": EngineXLPipeline, "img2img": EngineXLImg2ImgPipeline, "controlnet": EngineXLControlNetPipeline,
             "controlnet_img2img": EngineXLControlNetImg2ImgPipeline}


def assemble(task: str, manifest: Manifest, engines: dict[str, Any]):
    device = next(iter(engines.values())).device
    comps = manifest.components
    recorded = manifest.model.get("pipeline_config") or {}
    options = {k: recorded[k] for k in PIPELINE_OPTIONS[task] if k in recorded}
    controlnet = controlnet_module(manifest, engines, device)
    pipe = PIPELINES[task](
        **({"controlnet": controlnet} if controlnet else {}),
        vae=VaeShim(engines["vae_decoder"], engines.get("vae_encoder"), comps["vae_decoder"].config, device),
        text_encoder=HiddenStatesShim(engines["text_encoder"], comps["text_encoder"].config, device),
        text_encoder_2=HiddenStatesShim(engines["text_encoder_2"], comps["text_encoder_2"].config, device),
        tokenizer=load_tokenizer(manifest.folder / "tokenizer"),
        tokenizer_2=load_tokenizer(manifest.folder / "tokenizer_2"),
        unet=UNetShim(engines["unet"], comps["unet"].config, device),
        scheduler=load_scheduler(manifest.folder / "scheduler"),
        add_watermarker=False,
        **options,
    )
    pipe.manifest = manifest
    pipe.set_progress_bar_config(disable=None)
    return pipe


FAMILY = RuntimeFamily(
    name="sdxl",
    tasks=TASKS,
    assemble=assemble,
    assets=ASSETS,
    request_defaults={"steps": 20, "guidance_scale": 5.0},  # diffusers' SDXL guidance default
    request_fields=("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size"),
)
