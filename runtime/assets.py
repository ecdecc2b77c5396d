"""The tokenizer and scheduler folders an artifact carries, as diffusers saved them, loaded by the
class their config names (a transformers tokenizer, a diffusers scheduler, nothing else)."""
from __future__ import annotations

import json
from pathlib import Path

from runtime.errors import ArtifactError


def load_tokenizer(folder: Path):
    """The tokenizer saved in `folder`, of the transformers class its config names."""
    import transformers

    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    name = config.get("tokenizer_class") or "CLIPTokenizer"
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
        raise ArtifactError(f"{folder}: tokenizer class {name!r} is not a transformers tokenizer; rebuild the artifact")
    return cls.from_pretrained(folder)


def load_scheduler(folder: Path):
    """The scheduler saved in `folder`, of the diffusers class its config names."""
    import diffusers

    config = json.loads((folder / "scheduler_config.json").read_text(encoding="utf-8"))
    name = config.get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ArtifactError(f"{folder}: unknown scheduler class {name!r} for this diffusers; rebuild the artifact")
    return cls.from_pretrained(folder)
