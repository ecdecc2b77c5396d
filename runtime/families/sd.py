"""Stable Diffusion 1.x/2.x on the runtime side: StableDiffusion{,Img2Img}Pipeline subclasses whose
text encoder, UNet and VAE are engines."""
from __future__ import annotations

from typing import Any

from diffusers import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

from runtime.assets import load_scheduler, load_tokenizer
from runtime.controlnet import controlnet_module
from runtime.errors import RequestError, ShapeError
from runtime.families import CONTROLNETS, RuntimeFamily
from runtime.guards import EngineBacked
from runtime.manifest import Manifest
from runtime.requests import checked
from runtime.shims import TextEncoderShim, UNetShim, VaeShim

TASKS = {"text2img": ("text_encoder", "unet", "vae_decoder"),
         "img2img": ("text_encoder", "unet", "vae_decoder", "vae_encoder"),
         "controlnet": ("text_encoder", "unet", "vae_decoder", CONTROLNETS),
         "controlnet_img2img": ("text_encoder", "unet", "vae_decoder", "vae_encoder", CONTROLNETS)}


class EnginePipeline(EngineBacked, StableDiffusionPipeline):
    """StableDiffusionPipeline whose text encoder, UNet and VAE are engines."""

    manifest: Manifest

    def request_size(self, a: dict[str, Any]) -> tuple[int, int]:
        default = self.unet.config.sample_size * self.vae_scale_factor
        return tuple(default if a.get(k) is None else a[k] for k in ("height", "width"))  # 0 is an error, not "default"

    __call__ = checked(StableDiffusionPipeline.__call__)


class EngineImg2ImgPipeline(EngineBacked, StableDiffusionImg2ImgPipeline):
    """StableDiffusionImg2ImgPipeline whose models are engines; the image sets the size."""

    manifest: Manifest

    def request_size(self, a: dict[str, Any]) -> tuple[int, int]:
        image = a.get("image")
        if image is None:
            raise ShapeError("img2img needs an image; pass image=PIL.Image, numpy array or tensor", field="image")
        strength, steps = a.get("strength"), a.get("num_inference_steps") or 0
        if strength is not None and not (0 < strength <= 1 and int(steps * strength) >= 1):
            raise RequestError(f"strength {strength} with {steps} steps runs no denoising step: strength is how much "
                               "of the init image is replaced by noise (0 < strength <= 1), and steps x strength must "
                               "reach 1; raise one of them", field="strength")
        return image_size(image, self.manifest)

    __call__ = checked(StableDiffusionImg2ImgPipeline.__call__)


class EngineControlNetPipeline(EngineBacked, StableDiffusionControlNetPipeline):
    """StableDiffusionControlNetPipeline whose text encoder, UNet, VAE and ControlNets are engines."""

    manifest: Manifest

    def request_size(self, a: dict[str, Any]) -> tuple[int, int]:
        """height and width as given, else the control image's size (what diffusers would use)."""
        if a.get("height") is not None and a.get("width") is not None:
            return a["height"], a["width"]
        image = a.get("image")
        if image is None:
            raise ShapeError("a ControlNet pipeline needs its control image; pass image=", field="image")
        first = image[0] if isinstance(image, (list, tuple)) and image and isinstance(image[0], (list, tuple)) else image
        h, w = image_size(first, self.manifest)
        return (a.get("height") or h, a.get("width") or w)

    __call__ = checked(StableDiffusionControlNetPipeline.__call__)


class EngineControlNetImg2ImgPipeline(EngineBacked, StableDiffusionControlNetImg2ImgPipeline):
    """StableDiffusionControlNetImg2ImgPipeline whose models are engines; the init image sets the size
    unless height and width are given."""

    manifest: Manifest

    def request_size(self, a: dict[str, Any]) -> tuple[int, int]:
        if a.get("height") is not None and a.get("width") is not None:
            return a["height"], a["width"]
        return EngineImg2ImgPipeline.request_size(self, a)

    __call__ = checked(StableDiffusionControlNetImg2ImgPipeline.__call__)


def image_size(image, manifest: Manifest) -> tuple[int, int]:
    """(height, width) of an init image as given (PIL, numpy HWC or NHWC, tensor CHW or NCHW, or a
    list of them): diffusers would round it down to a multiple of 8, but the engines need the size
    multiple, so a size that is not one is refused naming the nearest that is."""
    import torch

    first = image[0] if isinstance(image, (list, tuple)) and image else image
    if hasattr(first, "size") and not hasattr(first, "shape"):  # PIL
        width, height = first.size
    elif hasattr(first, "shape") and len(first.shape) >= 3:
        shape = tuple(first.shape)[-3:]
        height, width = (shape[1], shape[2]) if isinstance(first, torch.Tensor) else (shape[0], shape[1])  # CHW / HWC
    else:
        raise ShapeError(f"img2img needs an image (PIL.Image, numpy array or tensor), got {type(first).__name__}",
                         field="image")
    m = manifest.size_multiple
    if height % m or width % m:
        near = f"{max(m, round(height / m) * m)}x{max(m, round(width / m) * m)}"
        raise ShapeError(f"the init image is {height}x{width} (height x width); these engines need both sides a "
                         f"multiple of {m}. Resize it, e.g. to {near}", field="image")
    return height, width


PIPELINES = {"text2img": EnginePipeline, "img2img": EngineImg2ImgPipeline, "controlnet": EngineControlNetPipeline,
             "controlnet_img2img": EngineControlNetImg2ImgPipeline}


def assemble_sd(pipelines: dict[str, type]):
    """An `assemble` for pipelines built like StableDiffusionPipeline (one CLIP text encoder, one
    UNet, one VAE); other families whose pipelines take the same components reuse it."""

    def assemble(task: str, manifest: Manifest, engines: dict[str, Any]):
        device = next(iter(engines.values())).device
        comps = manifest.components
        controlnet = controlnet_module(manifest, engines, device)
        pipe = pipelines[task](
            **({"controlnet": controlnet} if controlnet else {}),
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
        pipe.set_progress_bar_config(disable=None)  # tqdm: a bar on a terminal, nothing glued into logs elsewhere
        return pipe

    return assemble


FAMILY = RuntimeFamily(name="sd", tasks=TASKS, assemble=assemble_sd(PIPELINES))
