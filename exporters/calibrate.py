"""int8 calibration data: the UNet's actual inputs, recorded while the PyTorch pipeline denoises
calibration prompts (every timestep, both halves of classifier-free guidance)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from exporters.profile import Profile, profiles_dir
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


def record_unet_inputs(pipe, prompts: list[str], profile: Profile, steps: int, seed: int = 0) -> list[list[dict[str, Any]]]:
    """Run the PyTorch pipeline on each prompt at the profile's opt size; return, per prompt, the
    UNet inputs of every denoising step as numpy arrays keyed by the ONNX input names."""
    import torch

    recorded: list[dict[str, Any]] = []
    original = pipe.unet.forward

    def recording_forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        recorded.append({"sample": sample.detach().float().numpy().copy(),
                         "timestep": t.detach().numpy().copy(),
                         "encoder_hidden_states": encoder_hidden_states.detach().float().numpy().copy()})
        return original(sample, timestep, encoder_hidden_states, *args, **kwargs)

    per_prompt = []
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.forward = recording_forward
    try:
        for i, prompt in enumerate(prompts, 1):
            start = len(recorded)
            pipe(prompt, height=profile.height.opt, width=profile.width.opt, num_inference_steps=steps,
                 guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(seed + i), output_type="latent")
            per_prompt.append(recorded[start:])
            log.info("calibration [%d/%d]: %d UNet inputs recorded", i, len(prompts), len(recorded))
    finally:
        pipe.unet.forward = original
    return per_prompt
