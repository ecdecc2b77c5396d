"""A model source (builtin:NAME, local diffusers folder or hub id) → a validated ModelSource that
knows its family, its dims and its weights hash, and loads the PyTorch pipeline."""
from __future__ import annotations

import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from exporters import builtin
from exporters.dims import ModelDims
from exporters.families import Family
from exporters.validate import validate_folder
from runtime.errors import ModelSourceError
from runtime.files import file_sha256

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

__all__ = ["HUB_ID", "ModelDims", "ModelSource", "open_source"]  # and resolve_model, moved (see __getattr__)


@dataclass(frozen=True)
class ModelSource:
    """A validated diffusers folder, where it came from, and its family."""

    source: str
    folder: Path
    pipeline_class: str
    dims: ModelDims
    family: Family

    @functools.cached_property
    def weights_sha256(self) -> str:
        """Content hash of every file of the family's components (not of dates); computed once."""
        digest = hashlib.sha256()
        for component in self.family.folder_components:
            for path in sorted((self.folder / component).rglob("*")):
                if path.is_file():
                    digest.update(str(path.relative_to(self.folder)).encode())
                    digest.update(file_sha256(path).encode())
        return digest.hexdigest()

    @functools.cached_property
    def weights_bytes(self) -> int:
        """Bytes of the weight files of the family's components."""
        return sum(p.stat().st_size for c in self.family.folder_components for p in (self.folder / c).rglob("*.safetensors"))

    @functools.cached_property
    def keep_fp32(self) -> tuple[str, ...]:
        """Components this model's configs say must stay fp32 (see Family.keep_fp32)."""
        return tuple(self.family.keep_fp32(self.folder))

    def load_pipeline(self):
        """Load the PyTorch pipeline (fp32, eval) through diffusers."""
        return self.family.load_pipeline(self.folder)


def open_source(source: str) -> ModelSource:
    """A builtin:NAME, local folder or hub id → validated ModelSource."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in builtin.builtin_names():
            raise ModelSourceError(
                f"unknown built-in model '{name}'. Built-in models: {', '.join(builtin.builtin_names())}"
            )
        folder = builtin.ensure_builtin(name)
    elif Path(source).expanduser().is_dir():
        folder = Path(source).expanduser().resolve()
    elif HUB_ID.match(source):
        folder = _download(source)
    else:
        raise ModelSourceError(
            f"model source '{source}' is not a local folder; expected a diffusers folder, a hub id "
            "(org/name) or builtin:NAME"
        )
    pipeline_class, family = validate_folder(folder, source)
    return ModelSource(source=source, folder=folder, pipeline_class=pipeline_class, dims=family.read_dims(folder),
                       family=family)


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


def __getattr__(name: str):
    """resolve_model moved to exporters.resolve; importable from here as before."""
    if name == "resolve_model":
        from exporters.resolve import resolve_model

        return resolve_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
