"""Is a folder a diffusers pipeline kiln can export? Its model_index.json names the pipeline class,
which picks the family; the family says which components must be there."""
from __future__ import annotations

import json
from pathlib import Path

from exporters.families import Family, family_for
from runtime.errors import ModelSourceError, format_table

# The config file(s) that show a component folder is complete, by kind of component
# (text_encoder_2 is a text encoder, tokenizer_2 a tokenizer, ...); one of them must exist.
CONFIG_FILES = {
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer_config.json", "vocab.json", "tokenizer.json"),
    "unet": ("config.json",),
    "vae": ("config.json",),
    "scheduler": ("scheduler_config.json",),
    "controlnet": ("config.json",),
}


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.load runs code from these: never loaded


def config_files(component: str) -> tuple[str, ...]:
    kind = next((k for k in CONFIG_FILES if component == k or component.startswith(k + "_")), None)
    return CONFIG_FILES[kind] if kind else ("config.json",)


def validate_folder(folder: Path, source: str) -> tuple[str, Family]:
    """(pipeline class, family) of a diffusers folder, or ModelSourceError saying what is wrong."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelSourceError(
            f"{folder} is not a diffusers pipeline folder: it has no model_index.json. "
            "Pass a folder written by diffusers' save_pretrained"
        )
    index = json.loads(index_path.read_text(encoding="utf-8"))
    pipeline_class = index.get("_class_name", "?")
    family = family_for(pipeline_class, source)
    missing = []
    for component in family.folder_components:
        entry = index.get(component)
        expected = config_files(component)
        present = [f for f in expected if (folder / component / f).is_file()]
        if not isinstance(entry, list) or entry[0] is None:
            missing.append((component, "listed in model_index.json", "not listed"))
        elif not present:
            missing.append((component, f"{component}/{' or '.join(expected)}", "no such file"))
    if missing:
        raise ModelSourceError(
            f"{folder} is missing pipeline components; a {pipeline_class} needs {', '.join(family.folder_components)}:\n"
            + format_table(["component", "expected", "found"], missing)
            + "\nRe-save the complete pipeline with diffusers' save_pretrained"
        )
    pickled = [(c, ", ".join(sorted(p.name for p in found))) for c in family.folder_components
               if (found := [p for p in (folder / c).glob("*") if p.suffix in PICKLE_SUFFIXES])
               and not any((folder / c).glob("*.safetensors"))]
    if pickled:
        raise ModelSourceError(
            f"{folder} has weights only as pickles, which kiln does not load (loading a pickle runs code from it):\n"
            + format_table(["component", "files"], pickled)
            + "\nConvert them to safetensors: load the pipeline with diffusers where you trust the files and "
            "save_pretrained(folder, safe_serialization=True)"
        )
    return pipeline_class, family
