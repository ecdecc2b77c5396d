"""Request checks against the manifest, shared by every family's pipelines: a call is refused
before any engine runs when its size, batch or latents do not fit what the engines were built for."""
from __future__ import annotations

import functools
import inspect

from runtime.errors import ShapeError, format_table
from runtime.manifest import Manifest


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
        height, width = self.request_size(a)
        batch = prompt_batch(a.get("prompt"), a.get("prompt_embeds")) * (a.get("num_images_per_prompt") or 1)
        check_request(self.manifest, height=height, width=width, batch=batch)
        latents = a.get("latents")
        if latents is not None:
            expected = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            if tuple(latents.shape) != expected:
                raise ShapeError(f"latents must have shape {list(expected)} for this request, got {list(latents.shape)}",
                                 field="latents")
        with torch.no_grad():
            return call(self, *args, **kwargs)

    return __call__
