"""ModelDims: the numbers of a model that shapes depend on, and the config readers families use
to find them. UNet features are read from the UNet's config, as optimum does, so that any family
whose UNet has them gets them: `time_cond_proj_dim` (a guidance embedding, `timestep_cond`, as in
LCM) and `addition_embed_type = "text_time"` (SDXL's `text_embeds` and `time_ids`)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import ModelSourceError

SUPPORTED_ADDITION_EMBEDS = (None, "text_time")


@dataclass(frozen=True)
class ModelDims:
    """The numbers of a model that shapes depend on, read from its configs.

    unet_conditions: the UNet's extra conditioning inputs beyond sample, timestep and text, as
    (name, width) pairs of [unet_batch, width] float tensors, e.g. (("timestep_cond", 256),).
    guidance_batch: denoiser inputs per image under guidance: 2 where the pipeline runs
    classifier-free guidance (an unconditional half), 1 where the guidance is an embedding (LCM)
    or where the profile builds the UNet for guidance off (SDXL Turbo).
    text_encoders: for families with several text encoders (SDXL), per encoder (vocab size, hidden
    width, pooled projection width or 0); text_hidden_size is then the width the UNet sees."""

    vae_scale_factor: int
    size_multiple: int
    latent_channels: int
    unet_in_channels: int
    text_hidden_size: int
    max_tokens: int
    vocab_size: int
    native_height: int
    native_width: int
    unet_conditions: tuple[tuple[str, int], ...] = ()
    guidance_batch: int = 2
    text_encoders: tuple[tuple[int, int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = {**self.__dict__, "unet_conditions": [list(c) for c in self.unet_conditions],
             "text_encoders": [list(t) for t in self.text_encoders]}
        for key, default in (("guidance_batch", 2), ("text_encoders", [])):
            if d[key] == default:  # defaults stay out of the record, so SD's export keys are unchanged
                del d[key]
        return d


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def tokenizer_max_length(folder: Path, fallback: int) -> int:
    """model_max_length of a saved tokenizer, or `fallback` (the text encoder's position table)."""
    config = Path(folder) / "tokenizer_config.json"
    value = read_json(config).get("model_max_length") if config.is_file() else None
    # Tokenizers saved without a cap report a huge sentinel; CLIP's position table is the real limit.
    return int(value) if isinstance(value, int) and value <= fallback else fallback


def unet_conditions(unet: Mapping[str, Any], text_embeds_dim: int | None = None) -> tuple[tuple[str, int], ...]:
    """The extra conditioning inputs a UNet2DConditionModel config asks for (see ModelDims).
    `text_embeds_dim`: the pooled text embedding's width where the family knows it (SDXL's second
    text encoder); otherwise it is what the addition projection leaves after six time ids."""
    conditions = []
    if unet.get("time_cond_proj_dim"):
        conditions.append(("timestep_cond", int(unet["time_cond_proj_dim"])))
    kind = unet.get("addition_embed_type")
    if kind not in SUPPORTED_ADDITION_EMBEDS:
        raise ModelSourceError(f"the UNet's addition_embed_type is {kind!r}; kiln supports "
                               f"{', '.join(map(str, SUPPORTED_ADDITION_EMBEDS))}")
    if kind == "text_time":
        total, per_id = int(unet["projection_class_embeddings_input_dim"]), int(unet["addition_time_embed_dim"])
        text = text_embeds_dim if text_embeds_dim is not None else total - 6 * per_id
        if text <= 0 or (total - text) % per_id:
            raise ModelSourceError(f"the UNet's addition projection ({total}) does not split into text embeddings "
                                   f"({text}) and time ids of {per_id}; is the config complete?")
        conditions += [("text_embeds", text), ("time_ids", (total - text) // per_id)]
    return tuple(conditions)


def latent_geometry(unet: Mapping[str, Any], vae: Mapping[str, Any]) -> dict[str, int]:
    """VAE factor, the size multiple (VAE factor x 2^UNet upsamplers: what a traced UNet accepts)
    and the native image size, from the UNet and VAE configs."""
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    upsamplers = len(unet.get("up_block_types", ())) - 1
    sample_size = unet.get("sample_size", 64)
    if isinstance(sample_size, int):
        sample_size = [sample_size, sample_size]
    return {"vae_scale_factor": vae_scale, "size_multiple": vae_scale * 2 ** max(upsamplers, 0),
            "native_height": sample_size[0] * vae_scale, "native_width": sample_size[1] * vae_scale}
