"""Stable Diffusion 1.x/2.x on the export side: a CLIP text encoder, a UNet, a VAE decoder and
encoder, read from a StableDiffusion{,Img2Img}Pipeline folder."""
from __future__ import annotations

from pathlib import Path

from exporters import components
from exporters.calibrate import record_denoiser_inputs
from exporters.dims import ModelDims, latent_geometry, read_json, tokenizer_max_length, unet_conditions
from exporters.families import Family
from exporters.specs import ComponentSpec


def read_dims(folder: Path) -> ModelDims:
    unet = read_json(folder / "unet" / "config.json")
    vae = read_json(folder / "vae" / "config.json")
    text = read_json(folder / "text_encoder" / "config.json")
    return ModelDims(
        **latent_geometry(unet, vae),
        latent_channels=vae.get("latent_channels", 4),
        unet_in_channels=unet.get("in_channels", 4),
        text_hidden_size=text["hidden_size"],
        max_tokens=tokenizer_max_length(folder / "tokenizer", text.get("max_position_embeddings", 77)),
        vocab_size=text["vocab_size"],
        unet_conditions=unet_conditions(unet),
    )


def component_specs(dims: ModelDims) -> dict[str, ComponentSpec]:
    """The four component specs of a Stable Diffusion model with these dims."""
    specs = (components.clip_text_encoder(dims), components.unet(dims), components.vae_decoder(dims),
             components.vae_encoder(dims))
    return {s.name: s for s in specs}


def load_pipeline(folder: Path):
    """The PyTorch pipeline (fp32, eval) through diffusers."""
    from diffusers import StableDiffusionPipeline

    return load_with(StableDiffusionPipeline, folder)


SD_LOAD_OPTIONS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def load_with(pipeline_class, folder: Path, modules=("unet", "vae", "text_encoder"), options=SD_LOAD_OPTIONS):
    """`pipeline_class.from_pretrained(folder, **options)` from safetensors, its `modules` fp32 and
    eval, without the notices of components kiln does not use."""
    import torch

    from runtime.quiet import progress_bars_on_terminals_only, quiet

    with progress_bars_on_terminals_only(), quiet("transformers", "diffusers"):
        pipe = pipeline_class.from_pretrained(folder, use_safetensors=True, **options)
    for module in (getattr(pipe, m) for m in modules):
        if module.dtype != torch.float32:  # .to() on an fp32 model only prints diffusers' keep-in-fp32 notice
            module.to(torch.float32)
        module.eval()
    return pipe


FAMILY = Family(
    name="sd",
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    folder_components=("text_encoder", "tokenizer", "unet", "vae", "scheduler"),
    components=("text_encoder", "unet", "vae_decoder", "vae_encoder"),
    denoiser="unet",
    read_dims=read_dims,
    component_specs=component_specs,
    load_pipeline=load_pipeline,
    record_calibration=record_denoiser_inputs,
)
