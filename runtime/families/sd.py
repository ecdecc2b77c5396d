"""Stable Diffusion 1.x/2.x on the runtime side: StableDiffusion{,Img2Img}Pipeline subclasses whose
text encoder, UNet and VAE are engines."""
from __future__ import annotations

from typing import Any

from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from runtime.assets import load_scheduler, load_tokenizer
from runtime.errors import ShapeError
from runtime.families import RuntimeFamily
from runtime.manifest import Manifest
from runtime.requests import checked
from runtime.shims import TextEncoderShim, UNetShim, VaeShim

TASKS = {"text2img": ("text_encoder", "unet", "vae_decoder"),
         "img2img": ("text_encoder", "unet", "vae_decoder", "vae_encoder")}


class EnginePipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline whose text encoder, UNet and VAE are engines."""

    manifest: Manifest

    def request_size(self, a: dict[str, Any]) -> tuple[int, int]:
        default = self.unet.config.sample_size * self.vae_scale_factor
        return a.get("height") or default, a.get("width") or default

    __call__ = checked(StableDiffusionPipeline.__call__)


class EngineImg2ImgPipeline(StableDiffusionImg2ImgPipeline):
    """StableDiffusionImg2ImgPipeline whose models are engines; the image sets the size."""

    manifest: Manifest

    def request_size(self, a: dict[str, Any]) -> tuple[int, int]:
        image = a.get("image")
        if image is None:
            raise ShapeError("img2img needs an image; pass image=PIL.Image, numpy array or tensor", field="image")
        return self.image_processor.get_default_height_width(image)

    __call__ = checked(StableDiffusionImg2ImgPipeline.__call__)


PIPELINES = {"text2img": EnginePipeline, "img2img": EngineImg2ImgPipeline}


def assemble_sd(pipelines: dict[str, type]):
    """An `assemble` for pipelines built like StableDiffusionPipeline (one CLIP text encoder, one
    UNet, one VAE); other families whose pipelines take the same components reuse it."""

    def assemble(task: str, manifest: Manifest, engines: dict[str, Any]):
        device = next(iter(engines.values())).device
        comps = manifest.components
        pipe = pipelines[task](
            vae=VaeShim(engines["vae_decoder"], engines.get("vae_encoder"), comps["vae_decoder"].config, device),
            text_encoder=TextEncoderShim(engines["text_encoder"], comps["text_encoder"].config, device),
            tokenizer=load_tokenizer(manifest.folder / "tokenizer"),
            unet=UNetShim(engines["unet"], comps["unet"].config, device),
            scheduler=load_scheduler(manifest.folder / "scheduler"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.manifest = manifest
        return pipe

    return assemble


FAMILY = RuntimeFamily(name="sd", tasks=TASKS, assemble=assemble_sd(PIPELINES))
