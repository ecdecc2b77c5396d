"""SDXL (and SDXL Turbo) on the export side: a StableDiffusionXL{,Img2Img}Pipeline folder. Two CLIP
text encoders give the penultimate layer's hidden states (concatenated, the UNet's text), the
second also its pooled projection `text_embeds`; the UNet takes `text_embeds` and `time_ids` as
added conditions (detected from its config, exporters/dims.py); the VAE is SD's, kept fp32 under
fp16 where its config says `force_upcast` (SDXL's overflows in fp16)."""
from __future__ import annotations

from pathlib import Path

from exporters import components
from exporters.calibrate import record_denoiser_inputs
from exporters.dims import ModelDims, latent_geometry, read_json, tokenizer_max_length, unet_conditions
from exporters.families import Family
from exporters.families.sd import load_with
from exporters.specs import ComponentSpec
from runtime.errors import ExportError, ModelSourceError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
VAE_COMPONENTS = ("vae_decoder", "vae_encoder")
# the pipeline's own options that change what it computes (model_index.json); carried to the runtime
PIPELINE_OPTIONS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")


def read_dims(folder: Path) -> ModelDims:
    unet = read_json(folder / "unet" / "config.json")
    vae = read_json(folder / "vae" / "config.json")
    texts = [read_json(folder / t / "config.json") for t in TEXT_ENCODERS]
    pooled = int(texts[1].get("projection_dim") or 0)
    if not pooled:
        raise ModelSourceError(f"{folder}/text_encoder_2 has no projection_dim: an SDXL pipeline's second text encoder "
                               "is a CLIPTextModelWithProjection, whose pooled projection conditions the UNet")
    widths = [int(t["hidden_size"]) for t in texts]
    cross = unet.get("cross_attention_dim")
    if isinstance(cross, int) and cross != sum(widths):
        raise ModelSourceError(f"{folder}: the UNet's cross_attention_dim is {cross}, but its text encoders give "
                               f"{widths[0]} + {widths[1]} = {sum(widths)}; is this a complete SDXL pipeline?")
    tokens = [tokenizer_max_length(folder / tok, t.get("max_position_embeddings", 77)) for tok, t in zip(TOKENIZERS, texts)]
    if tokens[0] != tokens[1]:
        raise ModelSourceError(f"{folder}: the tokenizers cap prompts at {tokens[0]} and {tokens[1]} tokens; SDXL "
                               "concatenates both encoders' states token by token, so they must agree")
    return ModelDims(
        **latent_geometry(unet, vae),
        latent_channels=vae.get("latent_channels", 4),
        unet_in_channels=unet.get("in_channels", 4),
        text_hidden_size=sum(widths),
        max_tokens=tokens[0],
        vocab_size=min(int(t["vocab_size"]) for t in texts),
        unet_conditions=unet_conditions(unet, text_embeds_dim=pooled),
        text_encoders=tuple((int(t["vocab_size"]), w, p) for t, w, p in zip(texts, widths, (0, pooled))),
    )


def component_specs(dims: ModelDims) -> dict[str, ComponentSpec]:
    """Two text encoders (penultimate hidden states; the second also pooled), the UNet with its
    added conditions, the VAE decoder and encoder."""
    if len(dims.text_encoders) != len(TEXT_ENCODERS):
        raise ExportError(f"SDXL dims need both text encoders' widths (read_dims of the model folder); got "
                          f"{len(dims.text_encoders)}")
    texts = [components.clip_hidden_states(name, tokens=dims.max_tokens, vocab=vocab, hidden=hidden, pooled=pooled)
             for name, (vocab, hidden, pooled) in zip(TEXT_ENCODERS, dims.text_encoders)]
    specs = (*texts, components.unet(dims), components.vae_decoder(dims), components.vae_encoder(dims))
    return {s.name: s for s in specs}


def load_pipeline(folder: Path):
    from diffusers import StableDiffusionXLPipeline

    return load_with(StableDiffusionXLPipeline, folder, modules=("unet", "vae", *TEXT_ENCODERS),
                     options={"add_watermarker": False})


def keep_fp32(folder: Path) -> tuple[str, ...]:
    """The VAE, where its config asks to be upcast (diffusers' default when the key is absent)."""
    return VAE_COMPONENTS if read_json(folder / "vae" / "config.json").get("force_upcast", True) else ()


def pipeline_config(folder: Path) -> dict:
    """The pipeline options model_index.json sets (an img2img folder's requires_aesthetics_score too)."""
    index = read_json(folder / "model_index.json")
    return {k: index[k] for k in PIPELINE_OPTIONS if k in index}


FAMILY = Family(
    name="sdxl",
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    folder_components=(*TEXT_ENCODERS, *TOKENIZERS, "unet", "vae", "scheduler"),
    components=(*TEXT_ENCODERS, "unet", *VAE_COMPONENTS),
    denoiser="unet",
    read_dims=read_dims,
    component_specs=component_specs,
    load_pipeline=load_pipeline,
    record_calibration=record_denoiser_inputs,
    assets=(*TOKENIZERS, "scheduler"),
    keep_fp32=keep_fp32,
    pipeline_config=pipeline_config,
)
