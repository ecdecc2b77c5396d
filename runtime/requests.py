"""Request checks against the manifest, shared by every family's pipelines: a call is refused
before any engine runs when its size, batch or latents do not fit what the engines were built for."""
from __future__ import annotations

import functools
import inspect
import logging

from runtime.errors import NotSupportedError, RequestError, ShapeError, format_table
from runtime.manifest import Manifest

log = logging.getLogger(__name__)


def check_request(manifest: Manifest, *, height: int, width: int, batch: int) -> None:
    """Raise ShapeError naming the allowed ranges if height, width or the image batch do not fit;
    its `field` is the first argument at fault."""
    multiple = manifest.size_multiple
    problems = []
    for key, value in (("height", height), ("width", width)):
        lo, _, hi = manifest.shape_range(key)
        if not lo <= value <= hi or value % multiple:
            problems.append((key, value, f"{lo}..{hi}, a multiple of {multiple}"))
    lo, _, hi = manifest.shape_range("batch")
    if not 1 <= batch <= hi:
        problems.append(("batch (prompts x num_images_per_prompt)", batch, f"1..{hi}"))
    if problems:
        raise ShapeError(
            "the request does not fit the engines in " + str(manifest.folder) + ":\n"
            + format_table(["argument", "requested", "allowed"], problems)
            + "\nChange the request, or rebuild with a profile whose ranges cover it",
            field=problems[0][0].split()[0],
        )


def refuse_unsupported(a: dict) -> None:
    """Arguments of a diffusers __call__ that engines cannot honour, refused before any work."""
    kwargs = a.get("cross_attention_kwargs")
    scale = kwargs.get("scale") if isinstance(kwargs, dict) else None
    if kwargs:
        raise NotSupportedError(
            "cross_attention_kwargs cannot reach engines" + (f" (a LoRA scale of {scale} at call time)" if scale else "")
            + ": a LoRA is fused into the engines when they are built, at its scale, or (artifacts built with "
            "--refit refit) swapped in with pipe.set_adapters(names, adapter_weights=...) before the call")
    for name in ("ip_adapter_image", "ip_adapter_image_embeds"):
        if a.get(name) is not None:
            raise NotSupportedError(f"{name}: these engines have no IP-Adapter image projection; it needs a model "
                                    "built with one, which kiln does not export yet")


def check_guidance(pipe, a: dict) -> None:
    """A UNet built for guidance off (its batch is the image count) cannot run classifier-free
    guidance: refuse guidance_scale > 1 before anything runs. Past the guidance the artifact's
    model was made for (a Turbo or LCM-LoRA artifact), warn once per pipeline."""
    from runtime.families import generation

    recorded = generation(pipe.manifest)
    scale = a.get("guidance_scale")
    if scale is None:
        return
    cfg = scale > 1 and pipe.unet.config.get("time_cond_proj_dim") is None  # when diffusers runs the unconditional half
    if recorded.get("guidance") is False and cfg:
        raise RequestError(f"guidance_scale {scale} needs classifier-free guidance, but this artifact's UNet was built "
                           f"for guidance off (profile {pipe.manifest.profile.get('name')!r}: [generation] guidance = "
                           "false, a UNet batch of one per image); use guidance_scale <= 1, or rebuild with guidance "
                           "on", field="guidance_scale")
    limit = recorded.get("max_guidance_scale")
    if limit is not None and scale > limit and not getattr(pipe, "_warned_guidance", False):
        pipe._warned_guidance = True
        log.warning("guidance_scale %g is above the %g this model was made for (profile %r recommends %s steps at "
                    "guidance %s): expect burnt, oversaturated images", scale, limit, pipe.manifest.profile.get("name"),
                    recorded.get("steps"), recorded.get("guidance_scale"))


def embedding_shape(manifest) -> tuple[int, ...] | None:
    """The fixed trailing dims of the text conditioning the denoiser takes, e.g. (77, 768)."""
    unet = manifest.components.get("unet")
    tensor = next((t for t in unet.inputs if t.name == "encoder_hidden_states"), None) if unet else None
    return tuple(tensor.dims[1:]) if tensor and all(isinstance(d, int) for d in tensor.dims[1:]) else None


def prompt_batch(prompt, prompt_embeds) -> int:
    """Prompts in a call: one string, a list, or the rows of prompt_embeds."""
    if prompt is None:
        return prompt_embeds.shape[0] if prompt_embeds is not None else 1
    return 1 if isinstance(prompt, str) else len(prompt)


def checked(call):
    """Wrap a diffusers pipeline __call__: bind the caller's arguments to its signature, check the
    request against the manifest (the pipeline's `request_size` says which size it asks for), then
    run it unchanged, without gradients."""
    signature = inspect.signature(call)

    @functools.wraps(call)
    def __call__(self, *args, **kwargs):
        import torch

        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        refuse_unsupported(a)
        check_guidance(self, a)
        text_shape = embedding_shape(self.manifest)
        for name in ("prompt_embeds", "negative_prompt_embeds"):
            x = a.get(name)
            if x is not None and text_shape and (x.ndim != len(text_shape) + 1 or tuple(x.shape[1:]) != text_shape):
                raise ShapeError(f"{name} must have shape [batch, {', '.join(map(str, text_shape))}] for these engines, "
                                 f"got {list(x.shape)}", field=name)
        height, width = self.request_size(a)
        batch = prompt_batch(a.get("prompt"), a.get("prompt_embeds")) * (a.get("num_images_per_prompt") or 1)
        check_request(self.manifest, height=height, width=width, batch=batch)
        if hasattr(self.vae, "check_request"):  # the VAE engines' own range, or the tiles' (enable_vae_tiling)
            self.vae.check_request(height, width, batch)
        latents = a.get("latents")
        if latents is not None:
            expected = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            if tuple(latents.shape) != expected:
                raise ShapeError(f"latents must have shape {list(expected)} for this request, got {list(latents.shape)}",
                                 field="latents")
        with torch.no_grad():
            return call(self, *args, **kwargs)

    return __call__
