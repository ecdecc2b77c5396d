"""LoRAs fused at export: each 'FILE_OR_HUB_ID[:SCALE]' of the profile (and --lora) is found on
disk, hashed, loaded with diffusers' load_lora_weights (peft), fused at its scale and unloaded,
so that the traced graphs carry the fused weights. The hashes and scales enter the export key and
the manifest (model.loras); one artifact per LoRA set and scale."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import ExportError, ModelSourceError
from runtime.files import file_sha256

log = logging.getLogger(__name__)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights name, and the hub's convention


@dataclass(frozen=True)
class Lora:
    source: str  # as given: a file, a folder or a hub id
    path: Path  # the .safetensors file
    sha256: str
    scale: float

    def to_dict(self) -> dict:
        return {"source": self.source, "file": self.path.name, "sha256": self.sha256, "scale": self.scale}


_HASHES: dict[tuple[str, int, int], str] = {}


def resolve_loras(loras: tuple[tuple[str, float], ...]) -> list[Lora]:
    """(source, scale) pairs → Loras with their files found and hashed (hashes memoised per file state)."""
    out = []
    for source, scale in loras:
        path = lora_file(source)
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _HASHES:
            _HASHES[key] = file_sha256(path)
        out.append(Lora(source, path, _HASHES[key], scale))
    return out


def lora_file(source: str) -> Path:
    """A LoRA's .safetensors file: the file given, the one in a folder, or the hub repo's."""
    from exporters.source import HUB_ID

    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelSourceError(f"LoRA {source} is not a .safetensors file; kiln loads no pickles (.bin/.pt/.ckpt run "
                                   "code when loaded). Convert it with safetensors where you trust it")
        return path.absolute()  # not resolve(): a hub snapshot's file is a symlink to a blob with no suffix
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        named = [f for f in files if f.name == WEIGHT_NAME]
        if len(named) == 1 or len(files) == 1:
            return (named or files)[0].absolute()
        raise ModelSourceError(f"LoRA folder {source} holds {len(files)} .safetensors files "
                               f"({', '.join(f.name for f in files) or 'none'}); pass the file itself")
    if HUB_ID.match(source):
        from huggingface_hub import hf_hub_download

        log.info("downloading LoRA %s from the hub", source)
        try:
            return Path(hf_hub_download(source, WEIGHT_NAME))
        except Exception as exc:  # the hub client raises many unrelated types for "unreachable"
            raise ModelSourceError(
                f"LoRA '{source}' is not a local file or folder, so it was taken for a hub id, and {WEIGHT_NAME} "
                f"could not be downloaded from it ({type(exc).__name__}: {exc}). Check the path; where the network "
                "does not reach the hub, download the file elsewhere and pass its path") from exc
    raise ModelSourceError(f"LoRA '{source}' is neither a .safetensors file, a folder holding one, nor a hub id")


def fuse_loras(pipe, loras: list[Lora]) -> None:
    """Fuse each LoRA into the pipeline's weights at its scale, one after another, and unload it."""
    from runtime.quiet import quiet

    for i, lora in enumerate(loras):
        name = f"kiln_lora_{i}"
        log.info("fusing LoRA %s (scale %g, sha256 %s...)", lora.source, lora.scale, lora.sha256[:12])
        try:
            with quiet("diffusers", "peft", "transformers"):
                pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=name)
                touched = [c for c, names in pipe.get_list_adapters().items() if name in names]
                if not touched:
                    raise ExportError(f"LoRA {lora.source} changes none of this model's modules: is it made for another "
                                      "base model (an SD 1.5 LoRA on SDXL, or the reverse)?")
                pipe.fuse_lora(lora_scale=lora.scale, adapter_names=[name], components=touched)
                pipe.unload_lora_weights()
        except ExportError:
            raise
        except ImportError as exc:
            raise ExportError(f"fusing LoRAs needs peft: pip install peft ({exc})") from exc
        except Exception as exc:  # diffusers raises ValueError, KeyError, RuntimeError for keys or shapes that do not fit
            raise ExportError(f"LoRA {lora.source} does not fit this model ({type(exc).__name__}: {exc}); is it made "
                              "for this base model?") from exc
        log.debug("LoRA %s fused into %s", lora.source, ", ".join(touched))
