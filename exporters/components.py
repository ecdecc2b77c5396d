"""Component specs shared by the families: a CLIP text encoder, a UNet2DConditionModel (with the
conditioning inputs its config asks for), and the VAE decoder and encoder. Each builder returns a
frozen ComponentSpec with the exact module its graph is traced from; torch is imported only when
a wrapper is built."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exporters.dims import ModelDims
from exporters.specs import ComponentSpec, TensorSpec
from runtime.shapes import eval_dims

UNET_ADDED_CONDITIONS = ("text_embeds", "time_ids")  # passed to the UNet in added_cond_kwargs
# sample inputs of the UNet's extra conditions, where a standard normal is unlike the real ones:
# SDXL's time ids are image sizes and crop offsets in pixels
CONDITION_SAMPLES = {"time_ids": ("uniform", 0.0, 1024.0)}
LATENT = ("latent_height", "latent_width")


def config_of(attr: str) -> Callable[[Any], dict]:
    """pipeline → the config of its `attr` model, as a plain dict (what the runtime shim carries)."""

    def read(pipe) -> dict:
        config = getattr(pipe, attr).config
        return config.to_dict() if hasattr(config, "to_dict") else dict(config)

    return read


# ---- text encoder ---------------------------------------------------------------------------------


def _wrap_clip(attr: str, pick):
    """pipe → a module taking input_ids (any int type) and returning pick(text encoder, int64 ids)."""
    def wrap(pipe):
        import torch

        class TextEncoder(torch.nn.Module):
            def __init__(self, text_encoder):
                super().__init__()
                self.text_encoder = text_encoder

            def forward(self, input_ids):
                return pick(self.text_encoder, input_ids.to(torch.int64))

        return TextEncoder(getattr(pipe, attr)).eval()

    return wrap


def _last_hidden_state(encoder, ids):
    return encoder(ids, return_dict=False)[0]


def clip_text_encoder(dims: ModelDims, name: str = "text_encoder") -> ComponentSpec:
    """A CLIP text encoder's last hidden state, the text conditioning of SD 1.x/2.x."""
    return ComponentSpec(
        name=name,
        inputs=(TensorSpec("input_ids", "int32", ("batch", dims.max_tokens), ("int", 0, dims.vocab_size)),),
        outputs=(TensorSpec("text_embeddings", "float32", ("batch", dims.max_tokens, dims.text_hidden_size)),),
        wrap=_wrap_clip(name, _last_hidden_state),
        config_of=config_of(name),
        atol=1e-4,
        rtol=1e-4,
        module=name,
    )


def _hidden_states(pooled: bool, layer: int):
    """pick for _wrap_clip: (pooled projection,) hidden states of layer `layer` (SDXL's penultimate)."""
    def pick(encoder, ids):
        out = encoder(ids, output_hidden_states=True, return_dict=True)
        return (out.text_embeds, out.hidden_states[layer]) if pooled else out.hidden_states[layer]

    return pick


def clip_hidden_states(name: str, *, tokens: int, vocab: int, hidden: int, pooled: int = 0,
                       layer: int = -2) -> ComponentSpec:
    """A CLIP text encoder's hidden states of one layer (SDXL's conditioning: the penultimate) and,
    for a CLIPTextModelWithProjection (`pooled` > 0: its projection width), the pooled projection
    `text_embeds` the UNet takes as an added condition."""
    outputs = (TensorSpec("hidden_states", "float32", ("batch", tokens, hidden)),)
    if pooled:
        outputs = (TensorSpec("text_embeds", "float32", ("batch", pooled)), *outputs)
    return ComponentSpec(
        name=name,
        inputs=(TensorSpec("input_ids", "int32", ("batch", tokens), ("int", 0, vocab)),),
        outputs=outputs,
        wrap=_wrap_clip(name, _hidden_states(bool(pooled), layer)),
        config_of=config_of(name),
        atol=1e-4,
        rtol=1e-4,
        module=name,
    )


# ---- UNet -----------------------------------------------------------------------------------------


def _wrap_unet(condition_names: tuple[str, ...], residual_names: tuple[str, ...] = ()):
    def wrap(pipe):
        import inspect

        import torch

        class UNet(torch.nn.Module):
            """(sample, timestep, text, *conditions, *residuals) → the UNet's output; conditions are
            passed as timestep_cond or in added_cond_kwargs, by name; ControlNet residuals (the
            down blocks' then the mid block's) as down_block/mid_block_additional_residual(s)."""

            def __init__(self, unet):
                super().__init__()
                self.unet = unet

            def forward(self, sample, timestep, encoder_hidden_states, *rest):
                named = dict(zip(condition_names, rest[:len(condition_names)]))
                residuals = rest[len(condition_names):]
                added = {k: named.pop(k) for k in UNET_ADDED_CONDITIONS if k in named}
                if residuals:
                    named.update(down_block_additional_residuals=list(residuals[:-1]),
                                 mid_block_additional_residual=residuals[-1])
                return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added or None,
                                 return_dict=False, **named)[0]

        # The exporter names graph inputs (and their dynamic axes) after forward's parameters:
        # give the conditions parameters of their own names (PEP 362 __signature__).
        positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
        UNet.forward.__signature__ = inspect.Signature([
            inspect.Parameter(n, positional)
            for n in ("self", "sample", "timestep", "encoder_hidden_states", *condition_names, *residual_names)])
        return UNet(pipe.unet).eval()

    return wrap


def _unet_feed(condition_names: tuple[str, ...], residuals: tuple[TensorSpec, ...] = ()) -> Callable[[dict], dict]:
    def feed(call: dict) -> dict:
        """Bound arguments of a UNet2DConditionModel call → its ONNX inputs as float32 arrays
        (ControlNet residuals: the call's, or zeros where it ran without a ControlNet)."""
        import torch

        sample = call["sample"]
        t = torch.as_tensor(call["timestep"], dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        added = call.get("added_cond_kwargs") or {}
        values = {"sample": sample, "timestep": t, "encoder_hidden_states": call["encoder_hidden_states"],
                  **{n: added[n] if n in UNET_ADDED_CONDITIONS else call[n] for n in condition_names}}
        given = [*(call.get("down_block_additional_residuals") or ()), call.get("mid_block_additional_residual")]
        axes = {"unet_batch": sample.shape[0], "latent_height": sample.shape[2], "latent_width": sample.shape[3]}
        for r, value in zip(residuals, given if given[-1] is not None else [None] * len(residuals)):
            values[r.name] = torch.zeros(eval_dims(r.dims, axes)) if value is None else value
        return {n: v.detach().float().cpu().numpy().copy() for n, v in values.items()}

    return feed


def unet(dims: ModelDims, residuals: tuple[TensorSpec, ...] = ()) -> ComponentSpec:
    """A UNet2DConditionModel denoiser; the batch axis doubles under classifier-free guidance.
    `residuals`: ControlNet residual inputs (exporters/controlnet.residual_tensors), after the conditions."""
    latent = ("unet_batch", dims.unet_in_channels, *LATENT)
    conditions = tuple(TensorSpec(n, "float32", ("unet_batch", width), CONDITION_SAMPLES.get(n, ("normal", 0.0, 1.0)))
                       for n, width in dims.unet_conditions)
    names = tuple(t.name for t in conditions)
    return ComponentSpec(
        name="unet",
        inputs=(
            TensorSpec("sample", "float32", latent),
            TensorSpec("timestep", "float32", ("unet_batch",), ("uniform", 0.0, 999.0)),
            TensorSpec("encoder_hidden_states", "float32", ("unet_batch", dims.max_tokens, dims.text_hidden_size)),
            *conditions,
            *residuals,
        ),
        outputs=(TensorSpec("model_output", "float32", ("unet_batch", dims.latent_channels, *LATENT)),),
        wrap=_wrap_unet(names, tuple(r.name for r in residuals)),
        config_of=config_of("unet"),
        atol=1e-4,
        rtol=1e-4,
        module="unet",
        feed_from_call=_unet_feed(names, residuals),
    )


# ---- VAE ------------------------------------------------------------------------------------------


def _wrap_vae_decoder(pipe):
    import torch

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decode(latent, return_dict=False)[0]

    return VaeDecoder(pipe.vae).eval()


def _wrap_vae_encoder(pipe):
    import torch

    class VaeEncoder(torch.nn.Module):
        """Returns the latent distribution's parameters (mean ‖ log-variance); the runtime
        samples from them with the caller's generator, as diffusers' img2img does."""

        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, image):
            return self.vae.encode(image).latent_dist.parameters

    return VaeEncoder(pipe.vae).eval()


def _pixels(dims: ModelDims) -> tuple[str, str]:
    f = dims.vae_scale_factor
    return f"{f}*latent_height", f"{f}*latent_width"


def vae_decoder(dims: ModelDims) -> ComponentSpec:
    """AutoencoderKL.decode on latents already divided by scaling_factor."""
    return ComponentSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latent", "float32", ("batch", dims.latent_channels, *LATENT)),),
        outputs=(TensorSpec("images", "float32", ("batch", 3, *_pixels(dims))),),
        wrap=_wrap_vae_decoder,
        config_of=config_of("vae"),
        atol=1e-4,
        rtol=5e-4,
        module="vae",
    )


def vae_encoder(dims: ModelDims) -> ComponentSpec:
    """AutoencoderKL.encode → the latent distribution's mean and log-variance."""
    return ComponentSpec(
        name="vae_encoder",
        inputs=(TensorSpec("image", "float32", ("batch", 3, *_pixels(dims)), ("uniform", -1.0, 1.0)),),
        outputs=(TensorSpec("latent_parameters", "float32", ("batch", 2 * dims.latent_channels, *LATENT)),),
        wrap=_wrap_vae_encoder,
        config_of=config_of("vae"),
        atol=1e-4,
        rtol=5e-4,
        module="vae",
    )
