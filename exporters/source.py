"""Resolve MODEL (profile name, local diffusers folder or hub id) to a validated diffusers folder."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters import builtin
from exporters.profile import Profile, check_size_multiple, default_profile, load_profile, profile_names
from runtime.errors import ModelSourceError, format_table
from runtime.files import file_sha256

log = logging.getLogger(__name__)

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
REQUIRED_COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "scheduler")
_CONFIG_FILES = {
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer_config.json", "vocab.json", "tokenizer.json"),
    "unet": ("config.json",),
    "vae": ("config.json",),
    "scheduler": ("scheduler_config.json",),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelDims:
    """The numbers of a model that shapes depend on, read from its configs."""

    vae_scale_factor: int
    size_multiple: int
    latent_channels: int
    unet_in_channels: int
    text_hidden_size: int
    max_tokens: int
    vocab_size: int
    native_height: int
    native_width: int

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ModelSource:
    """A validated diffusers folder and where it came from."""

    source: str
    folder: Path
    pipeline_class: str
    dims: ModelDims

    @functools.cached_property
    def weights_sha256(self) -> str:
        """Content hash of every file of the five components (not of dates); computed once."""
        digest = hashlib.sha256()
        for component in REQUIRED_COMPONENTS:
            for path in sorted((self.folder / component).rglob("*")):
                if path.is_file():
                    digest.update(str(path.relative_to(self.folder)).encode())
                    digest.update(file_sha256(path).encode())
        return digest.hexdigest()

    def load_pipeline(self):
        """Load the PyTorch pipeline (fp32, eval) through diffusers."""
        import torch
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            self.folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.to(torch.float32).eval()
        return pipe


def resolve_model(model: str, profile_path: str | Path | None = None) -> tuple[ModelSource, Profile]:
    """MODEL → (validated source, resolved profile). `--profile FILE` overrides the shape ranges."""
    explicit = load_profile(profile_path, require_source=False) if profile_path is not None else None
    if model in profile_names():
        profile = load_profile(model)
        source = open_source(profile.source)
        if explicit is not None:
            profile = _with_source(explicit, profile.source)
    elif model.startswith("builtin:") or Path(model).expanduser().is_dir() or _HUB_ID.match(model):
        source = open_source(model)
        if explicit is not None:
            profile = _with_source(explicit, model)
        else:
            d = source.dims
            profile = default_profile(Path(model).name or model, model, d.native_height, d.native_width, d.size_multiple)
    else:
        raise ModelSourceError(
            f"MODEL '{model}' is neither a profile, a local folder nor a hub id. "
            f"Valid profiles: {', '.join(profile_names())}; or pass a path to a diffusers folder, "
            "or a hub id such as stabilityai/stable-diffusion-2-1"
        )
    check_size_multiple(profile, source.dims.size_multiple)
    return source, profile


def open_source(source: str) -> ModelSource:
    """A builtin:NAME, local folder or hub id → validated ModelSource."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in builtin.RECIPES:
            raise ModelSourceError(
                f"unknown built-in model '{name}'. Built-in models: {', '.join(builtin.builtin_names())}"
            )
        folder = builtin.ensure_builtin(name)
    elif Path(source).expanduser().is_dir():
        folder = Path(source).expanduser().resolve()
    elif _HUB_ID.match(source):
        folder = _download(source)
    else:
        raise ModelSourceError(
            f"model source '{source}' is not a local folder; expected a diffusers folder, a hub id "
            "(org/name) or builtin:NAME"
        )
    pipeline_class = _validate_folder(folder, source)
    return ModelSource(source=source, folder=folder, pipeline_class=pipeline_class, dims=_read_dims(folder))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    log.info("downloading %s from the hub (diffusers format, fp32 safetensors)", repo_id)
    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "*/*.safetensors"],
            ignore_patterns=["*fp16*", "*ema*", "*non_ema*", "safety_checker/*", "feature_extractor/*"],
        )
    except Exception as exc:  # the hub client raises many unrelated types for "unreachable"
        raise ModelSourceError(
            f"could not download '{repo_id}' from the hub ({type(exc).__name__}: {exc}). "
            "Where the network does not reach the hub, download the model elsewhere "
            "(diffusers save_pretrained or a hub snapshot) and pass the local folder as MODEL"
        ) from exc
    return Path(path)


def _validate_folder(folder: Path, source: str) -> str:
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelSourceError(
            f"{folder} is not a diffusers pipeline folder: it has no model_index.json. "
            "Pass a folder written by diffusers' save_pretrained"
        )
    index = json.loads(index_path.read_text(encoding="utf-8"))
    pipeline_class = index.get("_class_name", "?")
    if pipeline_class not in SUPPORTED_PIPELINES:
        raise ModelSourceError(
            f"{source} is a {pipeline_class}, which kiln does not support yet. "
            f"Supported pipeline classes: {', '.join(SUPPORTED_PIPELINES)}"
        )
    missing = []
    for component in REQUIRED_COMPONENTS:
        entry = index.get(component)
        present = [f for f in _CONFIG_FILES[component] if (folder / component / f).is_file()]
        if not isinstance(entry, list) or entry[0] is None:
            missing.append((component, "listed in model_index.json", "not listed"))
        elif not present:
            missing.append((component, f"{component}/{' or '.join(_CONFIG_FILES[component])}", "no such file"))
    if missing:
        raise ModelSourceError(
            f"{folder} is missing pipeline components; a {pipeline_class} needs {', '.join(REQUIRED_COMPONENTS)}:\n"
            + format_table(["component", "expected", "found"], missing)
            + "\nRe-save the complete pipeline with diffusers' save_pretrained"
        )
    return pipeline_class


def _read_dims(folder: Path) -> ModelDims:
    unet = _json(folder / "unet" / "config.json")
    vae = _json(folder / "vae" / "config.json")
    text = _json(folder / "text_encoder" / "config.json")
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    upsamplers = len(unet.get("up_block_types", ())) - 1
    sample_size = unet.get("sample_size", 64)
    if isinstance(sample_size, int):
        sample_size = [sample_size, sample_size]
    max_tokens = _tokenizer_max_length(folder, text.get("max_position_embeddings", 77))
    return ModelDims(
        vae_scale_factor=vae_scale,
        size_multiple=vae_scale * 2 ** max(upsamplers, 0),
        latent_channels=vae.get("latent_channels", 4),
        unet_in_channels=unet.get("in_channels", 4),
        text_hidden_size=text["hidden_size"],
        max_tokens=max_tokens,
        vocab_size=text["vocab_size"],
        native_height=sample_size[0] * vae_scale,
        native_width=sample_size[1] * vae_scale,
    )


def _tokenizer_max_length(folder: Path, fallback: int) -> int:
    config = folder / "tokenizer" / "tokenizer_config.json"
    value = _json(config).get("model_max_length") if config.is_file() else None
    # Tokenizers saved without a cap report a huge sentinel; CLIP's position table is the real limit.
    return int(value) if isinstance(value, int) and value <= fallback else fallback


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _with_source(profile: Profile, source: str) -> Profile:
    from dataclasses import replace

    return replace(profile, source=source)
