"""int8 calibration data: the denoiser's actual inputs, recorded while the PyTorch pipeline denoises
calibration prompts (every timestep, both halves of classifier-free guidance)."""
from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

from exporters.profile import Profile, profiles_dir
from exporters.specs import ComponentSpec
from runtime.errors import ExportError

log = logging.getLogger(__name__)

MIN_PROMPTS = 32  # for real models; a handful of prompts under-represents activation ranges
BUILTIN_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red fox in the snow",
    "an oil painting of a harbour at sunset",
    "a bowl of ramen, food photography",
    "a futuristic city at night with neon lights",
    "a watercolour of a cottage in a flower garden",
    "a portrait of an old fisherman",
    "a lighthouse on a rocky coast in a storm",
)
GUIDANCE = 7.5


def calibration_prompts(profile: Profile, builtin: bool, override: str | Path | None = None) -> list[str]:
    """The prompts to calibrate on: --calibration-prompts, else the profile's file, else (for the
    built-in tiny models only) a built-in list. A real model without prompts is an error."""
    location = override or profile.int8.calibration_prompts
    if location is None:
        if builtin:
            return list(BUILTIN_PROMPTS)
        raise ExportError(
            f"int8 needs calibration prompts for {profile.source}: pass --calibration-prompts FILE "
            f"(one prompt per line, at least {MIN_PROMPTS}) or set [int8] calibration_prompts in the profile; "
            "profiles/calibration/sd-prompts.txt is a general-purpose list"
        )
    path = Path(location)
    if not path.is_absolute() and not path.is_file():
        path = profiles_dir() / path
    if not path.is_file():
        raise ExportError(f"calibration prompt file {location} does not exist (looked in . and {profiles_dir()})")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if not builtin and len(prompts) < MIN_PROMPTS:
        raise ExportError(
            f"{path} has {len(prompts)} calibration prompts; a real model needs at least {MIN_PROMPTS} "
            "for representative int8 ranges. Add prompts like the ones your service will see"
        )
    return prompts


def calibration_guidance(profile: Profile) -> float:
    """The guidance the pipeline calibrates at: the profile's recommended one, else 7.5 (0 for a
    UNet built for guidance off)."""
    g = profile.generation
    return g.guidance_scale if g.guidance_scale is not None else (GUIDANCE if g.guidance else 0.0)


def record_denoiser_inputs(pipe, spec: ComponentSpec, prompts: list[str], profile: Profile, steps: int,
                           seed: int = 0) -> list[list[dict[str, Any]]]:
    """Run the PyTorch pipeline on each prompt at the profile's opt size; return, per prompt, the
    inputs of every call of the denoiser (`spec.module`) as numpy arrays keyed by the ONNX input
    names (`spec.feed_from_call` maps a call to them)."""
    import torch

    if spec.feed_from_call is None:
        raise ExportError(f"{spec.name} has no calibration feed; int8 cannot calibrate it")
    module = getattr(pipe, spec.module)
    original = module.forward
    signature = inspect.signature(type(module).forward)  # the model's own, whatever wraps this instance's
    recorded: list[dict[str, Any]] = []

    def recording_forward(*args, **kwargs):
        recorded.append(spec.feed_from_call(signature.bind(module, *args, **kwargs).arguments))
        return original(*args, **kwargs)

    per_prompt = []
    pipe.set_progress_bar_config(disable=True)
    module.forward = recording_forward
    try:
        for i, prompt in enumerate(prompts, 1):
            start = len(recorded)
            pipe(prompt, height=profile.height.opt, width=profile.width.opt, num_inference_steps=steps,
                 guidance_scale=calibration_guidance(profile),
                 generator=torch.Generator().manual_seed(seed + i), output_type="latent")
            per_prompt.append(recorded[start:])
            log.info("calibration [%d/%d]: %d %s inputs recorded", i, len(prompts), len(recorded), spec.name)
    finally:
        module.forward = original
    return per_prompt
