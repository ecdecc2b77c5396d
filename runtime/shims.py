"""torch.nn.Module shims that put engines where diffusers expects its models.

Each carries the original component's `.config` and reports `.device`/`.dtype`, so a diffusers
pipeline's own code (encode_prompt, prepare_latents, the denoising loop) runs as is. These are
shared by the families; a family module picks the ones its pipeline needs.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict

from runtime.errors import ArtifactError, KilnError, RequestError

Engine = Callable[..., Mapping[str, torch.Tensor]]
UNET_CORE_INPUTS = ("sample", "timestep", "encoder_hidden_states")


class EngineModule(torch.nn.Module):
    def __init__(self, config: Mapping[str, Any], device: torch.device):
        super().__init__()
        self.config = FrozenDict(config)
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32


def refuse(component: str, **kwargs) -> None:
    """Raise RequestError for arguments an engine cannot honour (anything set but None, {} or False)."""
    used = [k for k, v in kwargs.items() if v not in (None, {}, False)]
    if used:
        raise RequestError(
            f"{component} engine does not support {', '.join(used)}; these need the PyTorch model "
            "(or a rebuild that bakes them in)", field=used[0]
        )


class TextEncoderShim(EngineModule):
    """A CLIP text encoder engine that returns the last hidden state (SD 1.x/2.x, LCM)."""

    def __init__(self, engine: Engine, config, device):
        super().__init__(config, device)
        self.engine = engine

    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, **kwargs):
        refuse("text_encoder", output_hidden_states=output_hidden_states)
        embeddings = self.engine(input_ids=input_ids.to(torch.int32))["text_embeddings"].clone()
        return (embeddings,)


class _HiddenStates:
    """The one layer of hidden states an engine returns, where diffusers indexes all of them:
    `hidden_states[-2]` (SDXL's penultimate layer) is the engine's; any other (clip_skip) is refused."""

    def __init__(self, states: torch.Tensor, layer: int = -2):
        self._states, self._layer = states, layer

    def __getitem__(self, index):
        if index != self._layer:
            raise RequestError(f"these text encoder engines return the hidden states of layer {self._layer} only (the "
                               f"penultimate, which SDXL uses); clip_skip asks for layer {index}. Leave clip_skip "
                               "out, or pass prompt_embeds computed elsewhere", field="clip_skip")
        return self._states


class TextEncoderOutput(tuple):
    """What diffusers reads of a CLIPTextModel(WithProjection) call with output_hidden_states=True:
    item 0 (the pooled projection of a projecting encoder; else the states) and `.hidden_states`."""

    hidden_states: _HiddenStates


class HiddenStatesShim(EngineModule):
    """A CLIP text encoder engine that returns one layer's hidden states and, for a projecting
    encoder (SDXL's second), the pooled projection `text_embeds`: SDXL's encode_prompt reads both."""

    def __init__(self, engine: Engine, config, device):
        super().__init__(config, device)
        self.engine = engine
        self.pooled = any(t.name == "text_embeds" for t in engine.info.outputs)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, **kwargs):
        out = self.engine(input_ids=input_ids.to(torch.int32))
        states = out["hidden_states"].clone()
        result = TextEncoderOutput((out["text_embeds"].clone() if self.pooled else states,))
        result.hidden_states = _HiddenStates(states)
        return result


class UNetShim(EngineModule):
    """A UNet2DConditionModel engine. Conditions beyond sample, timestep and text are the engine's
    extra inputs, read from the manifest: `timestep_cond` (LCM's guidance embedding) and the
    `added_cond_kwargs` entries (SDXL's text_embeds and time_ids) go to the inputs of those names."""

    def __init__(self, engine: Engine, config, device):
        super().__init__(config, device)
        self.engine = engine
        self.extra_inputs = tuple(t.name for t in engine.info.inputs if t.name not in UNET_CORE_INPUTS)
        if self.config.get("addition_embed_type") == "text_time":  # SDXL's pipelines check the added projection's width
            from types import SimpleNamespace

            width = int(self.config["projection_class_embeddings_input_dim"])
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width))

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, return_dict=True, **kwargs):
        refuse("unet", cross_attention_kwargs=cross_attention_kwargs, **kwargs)
        given = {**(added_cond_kwargs or {}), **({"timestep_cond": timestep_cond} if timestep_cond is not None else {})}
        unknown = sorted(set(given) - set(self.extra_inputs))
        missing = [n for n in self.extra_inputs if n not in given]
        if unknown or missing:
            raise RequestError(f"unet engine takes the extra conditions {list(self.extra_inputs) or 'none'}; this call "
                            f"gave {sorted(given) or 'none'}" + (f" (unknown: {unknown})" if unknown else "")
                            + (f" (missing: {missing})" if missing else "") + ". Rebuild from a model whose UNet "
                            "config has them, or call the pipeline this artifact was built for",
                               field=(unknown or missing)[0])
        # The scheduler loop passes a 0-d timestep: the engine takes one per batch row, as float32.
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1)
        t = t.expand(sample.shape[0]) if t.numel() == 1 else t
        out = self.engine(sample=sample, timestep=t, encoder_hidden_states=encoder_hidden_states,
                          **{n: given[n] for n in self.extra_inputs})["model_output"]
        out = out.clone()  # schedulers keep past model outputs; the engine reuses its buffer
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


class VaeShim(EngineModule):
    """decode() runs the decoder engine on latents already divided by scaling_factor; encode()
    returns the latent distribution built from the encoder engine's mean and log-variance."""

    def __init__(self, decoder: Engine, encoder: Engine | None, config, device):
        super().__init__(config, device)
        self.decoder = decoder
        self.encoder = encoder

    def decode(self, z, return_dict=True, generator=None):
        images = self.decoder(latent=z)["images"].clone()
        if not return_dict:
            return (images,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=images)

    def encode(self, x, return_dict=True):
        if self.encoder is None:
            raise ArtifactError("this pipeline was loaded without the vae_encoder engine; load it with task='img2img'")
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = self.encoder(image=x)["latent_parameters"].clone()
        dist = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def forward(self, *args, **kwargs):
        raise KilnError("call vae.decode() or vae.encode(); the engine-backed VAE has no forward()")
