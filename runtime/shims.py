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

from runtime.controlnet_names import MID_RESIDUAL
from runtime.errors import ArtifactError, KilnError, RequestError, ShapeError
from runtime.shapes import eval_dims
from runtime.vae_tiling import DEFAULT_OVERLAP, choose_tile, sliced, tiled

Engine = Callable[..., Mapping[str, torch.Tensor]]
UNET_CORE_INPUTS = ("sample", "timestep", "encoder_hidden_states")


class OnEngineDevice:
    """`.device` (the engine's, set as `_device`) and `.dtype` (float32: engines take and return it),
    before any diffusers model class's own, which would look for weights."""

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32


class EngineModule(OnEngineDevice, torch.nn.Module):
    def __init__(self, config: Mapping[str, Any], device: torch.device):
        super().__init__()
        self.config = FrozenDict(config)
        self._device = torch.device(device)


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
        names = tuple(t.name for t in engine.info.inputs if t.name not in UNET_CORE_INPUTS)
        self.residuals = tuple(t for t in engine.info.inputs if t.name.startswith("down_residual_") or t.name == MID_RESIDUAL)
        self.extra_inputs = tuple(n for n in names if n not in {t.name for t in self.residuals})
        if self.config.get("addition_embed_type") == "text_time":  # SDXL's pipelines check the added projection's width
            from types import SimpleNamespace

            width = int(self.config["projection_class_embeddings_input_dim"])
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=width))

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, down_block_additional_residuals=None, mid_block_additional_residual=None,
                return_dict=True, **kwargs):
        refuse("unet", cross_attention_kwargs=cross_attention_kwargs, **kwargs)
        residuals = self._residuals(sample, down_block_additional_residuals, mid_block_additional_residual)
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
                          **{n: given[n] for n in self.extra_inputs}, **residuals)["model_output"]
        out = out.clone()  # schedulers keep past model outputs; the engine reuses its buffer
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


    def _residuals(self, sample, down, mid) -> dict[str, torch.Tensor]:
        """ControlNet residuals by input name: the call's, or zeros where a UNet built to take them
        runs without a ControlNet (text-to-image from a ControlNet artifact)."""
        if down is None and mid is None:
            if not self.residuals:
                return {}
            axes = {"latent_height": sample.shape[2], "latent_width": sample.shape[3], "unet_batch": sample.shape[0]}
            return {t.name: torch.zeros(eval_dims(t.dims, axes), device=sample.device) for t in self.residuals}
        given = [*(down or ()), mid]
        if not self.residuals or len(given) != len(self.residuals) or mid is None:
            raise RequestError(f"unet engine takes {max(len(self.residuals) - 1, 0)} down-block residuals and a mid-block "
                               f"one; this call gave {len(down or ())} down-block and {'a' if mid is not None else 'no'} "
                               "mid-block residual" + ("" if self.residuals else " (this artifact was built without "
                                                      "--controlnet)"), field="down_block_additional_residuals")
        return {t.name: r for t, r in zip(self.residuals, given)}


class VaeShim(EngineModule):
    """decode() runs the decoder engine on latents already divided by scaling_factor; encode()
    returns the latent distribution built from the encoder engine's mean and log-variance.
    enable_slicing()/enable_tiling() work as on diffusers' AutoencoderKL (runtime/vae_tiling.py):
    the tiles (tile_sample_min_size, tile_latent_min_size, tile_overlap_factor as diffusers names
    them; diffusers' defaults where they fit the engines) must lie inside the engines' ranges."""

    def __init__(self, decoder: Engine, encoder: Engine | None, config, device):
        super().__init__(config, device)
        self.decoder = decoder
        self.encoder = encoder
        self.use_slicing = False
        self.use_tiling = False
        self.factor = 2 ** (len(self.config["block_out_channels"]) - 1)
        sample = self.config.get("sample_size", 512)
        sample = int(sample[0] if isinstance(sample, (list, tuple)) else sample)
        # diffusers' tile (the VAE config's sample_size), or the largest the engines take where it is larger
        sides = [min(decoder.info.inputs[0].max[2:])]
        if encoder is not None:
            sides.append(min(encoder.info.inputs[0].max[2:]) // self.factor)
        latent = int(sample / self.factor)
        self.tile_latent_min_size = min(latent, *sides)
        self.tile_sample_min_size = sample if self.tile_latent_min_size == latent else self.tile_latent_min_size * self.factor
        self.tile_overlap_factor = DEFAULT_OVERLAP

    def enable_tiling(self, use_tiling: bool = True):
        self.use_tiling = use_tiling
        self._release_arenas()

    def disable_tiling(self):
        self.enable_tiling(False)

    def enable_slicing(self):
        self.use_slicing = True
        self._release_arenas()

    def disable_slicing(self):
        self.use_slicing = False
        self._release_arenas()

    def _release_arenas(self):
        """Tiled or sliced, ONNX Runtime CPU engines free each run's memory (OrtEngine.release_arena)."""
        for engine in (self.decoder, self.encoder):
            if hasattr(engine, "release_arena"):
                engine.release_arena = self.use_tiling or self.use_slicing

    def check_request(self, height: int, width: int, batch: int) -> None:
        """Refuse, before anything runs, a size or batch the VAE engines cannot decode (or encode) as
        configured: larger than they were built for without tiling, or with no tile that fits them."""
        per_call = 1 if self.use_slicing else batch
        jobs = [(self.decoder, height // self.factor, width // self.factor)]
        if self.encoder is not None:
            jobs.append((self.encoder, height, width))
        for engine, h, w in jobs:
            tensor = engine.info.inputs[0]
            if self.use_tiling and self._tile(engine, per_call, h, w):  # checks the whole plan; None: runs whole
                continue
            if h > tensor.max[2] or w > tensor.max[3]:
                f = self.factor if engine is self.decoder else 1
                raise ShapeError(f"{height}x{width} is larger than the {engine.info.name} engine was built for (up to "
                                 f"{tensor.max[2] * f}x{tensor.max[3] * f}); pipe.enable_vae_tiling() (kiln generate "
                                 "--vae-tiling) decodes larger images in tiles, or rebuild with larger [shapes]",
                                 field="height")
            engine.info.output_shapes({tensor.name: (per_call, tensor.dims[1], h, w)})

    def _tile(self, engine, batch: int, h: int, w: int) -> tuple[int, int] | None:
        """(tile side in, tile side out) for tiling an h x w input of `engine`, or None to run it whole
        (where diffusers would not tile it, or no tile fits but the engine takes it whole): its
        configured tile (tile_latent_min_size for decoding, tile_sample_min_size for encoding), or
        the closest that fits the engine (runtime/vae_tiling.choose_tile)."""
        decoding = engine is self.decoder
        tile = self.tile_latent_min_size if decoding else self.tile_sample_min_size
        if h <= tile and w <= tile:
            return None
        configured = self.tile_sample_min_size if decoding else self.tile_latent_min_size

        def out_of(t: int) -> int:
            return configured if t == tile else (t * self.factor if decoding else t // self.factor)

        t = choose_tile(engine.info, batch, h, w, tile, self.tile_overlap_factor, out_of)
        return None if t is None else (t, out_of(t))

    def _decode_one(self, z):
        return self.decoder(latent=z)["images"]

    def _decode(self, z):
        tiles = self._tile(self.decoder, z.shape[0], *z.shape[-2:]) if self.use_tiling else None
        if tiles:
            return tiled(z, self._decode_one, *tiles, self.tile_overlap_factor)
        return self._decode_one(z).clone()

    def decode(self, z, return_dict=True, generator=None):
        images = sliced(z, self._decode) if self.use_slicing and z.shape[0] > 1 else self._decode(z)
        if not return_dict:
            return (images,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=images)

    def _encode_one(self, x):
        return self.encoder(image=x)["latent_parameters"]

    def _encode(self, x):
        tiles = self._tile(self.encoder, x.shape[0], *x.shape[-2:]) if self.use_tiling else None
        if tiles:
            return tiled(x, self._encode_one, *tiles, self.tile_overlap_factor)
        return self._encode_one(x).clone()

    def encode(self, x, return_dict=True):
        if self.encoder is None:
            raise ArtifactError("this pipeline was loaded without the vae_encoder engine; load it with task='img2img'")
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = sliced(x, self._encode) if self.use_slicing and x.shape[0] > 1 else self._encode(x)
        dist = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def forward(self, *args, **kwargs):
        raise KilnError("call vae.decode() or vae.encode(); the engine-backed VAE has no forward()")
