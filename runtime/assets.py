"""The tokenizer and scheduler folders an artifact carries, as diffusers saved them, loaded by the
class their config names: only the tokenizer classes kiln's families use, only diffusers schedulers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtime.errors import ArtifactError

TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")  # what the families' text encoders read


def _config(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ArtifactError(f"{path.parent} has no {path.name}; the artifact is incomplete, rebuild it")
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); rebuild the artifact") from exc
    if not isinstance(config, dict):
        raise ArtifactError(f"{path} must hold a JSON object, found {type(config).__name__}; rebuild the artifact")
    return config


def load_tokenizer(folder: Path):
    """The tokenizer saved in `folder`, of the class its config names (one of TOKENIZERS)."""
    import transformers

    name = _config(folder / "tokenizer_config.json", required=False).get("tokenizer_class") or "CLIPTokenizer"
    if name not in TOKENIZERS:
        raise ArtifactError(f"{folder}: tokenizer class {name!r} is not one kiln loads ({', '.join(TOKENIZERS)}); "
                            "rebuild the artifact")
    try:
        return getattr(transformers, name).from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ArtifactError(f"{folder}: the tokenizer could not be loaded ({type(exc).__name__}: {exc}); "
                            "rebuild the artifact") from exc


def load_scheduler(folder: Path):
    """The scheduler saved in `folder`, of the diffusers class its config names."""
    import diffusers

    name = _config(folder / "scheduler_config.json", required=True).get("_class_name", "")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ArtifactError(f"{folder}: unknown scheduler class {name!r} for this diffusers; rebuild the artifact")
    try:
        return cls.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ArtifactError(f"{folder}: the scheduler could not be loaded ({type(exc).__name__}: {exc}); "
                            "rebuild the artifact") from exc
