"""The MODEL argument (profile name, builtin:NAME, local diffusers folder or hub id) → a validated
source and the profile its engines are built for, bound to the source's family."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from exporters.families import known_components
from exporters.profile import Profile, bind_family, check_size_multiple, default_profile, load_profile, profile_names
from exporters.source import HUB_ID, ModelSource, open_source
from runtime.errors import ModelSourceError


def resolve_model(model: str, profile_path: str | Path | None = None) -> tuple[ModelSource, Profile]:
    """MODEL → (validated source, resolved profile). `--profile FILE` overrides the shape ranges."""
    explicit = load_profile(profile_path, require_source=False) if profile_path is not None else None
    if explicit is not None:  # component names no family has: before any download or model build
        bind_family(explicit, tuple(sorted(known_components())), None)
    if model in profile_names():
        profile = load_profile(model)
        bind_family(profile, tuple(sorted(known_components())), None)
        source = open_source(profile.source)
        if explicit is not None:
            profile = replace(explicit, source=profile.source)
    elif model.startswith("builtin:") or Path(model).expanduser().is_dir() or HUB_ID.match(model):
        source = open_source(model)
        if explicit is not None:
            profile = replace(explicit, source=model)
        else:
            d = source.dims
            profile = default_profile(Path(model).name or model, model, d.native_height, d.native_width, d.size_multiple)
    else:
        raise ModelSourceError(
            f"MODEL '{model}' is neither a profile, a local folder nor a hub id. "
            f"Valid profiles: {', '.join(profile_names())}; or pass a path to a diffusers folder, "
            "or a hub id such as stabilityai/stable-diffusion-2-1"
        )
    from exporters.export import model_components

    components = model_components(source.family, profile)
    profile = bind_family(profile, components, source.family.denoiser).keeping_fp32(source.keep_fp32)
    check_size_multiple(profile, source.dims.size_multiple)
    return source, profile
