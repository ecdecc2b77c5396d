"""Hand-built records of the tiny model for pure decision tests: the component records an export
of `tiny` writes, computed from its dims and profile without exporting (the same functions the
exporter uses), and minimal artifact folders written by the artifact module itself."""
from __future__ import annotations

from pathlib import Path

from exporters.dims import ModelDims
from exporters.families.sd import component_specs
from exporters.profile import bind_family, profile_from_dict
from exporters.specs import tensor_ranges
from runtime.manifest import ComponentInfo, component_entry, load_manifest, manifest_record, write_manifest

# builtin:tiny (exporters/builtin.py): VAE factor 8, four UNet levels, 32-wide CLIP, byte-level vocabulary
TINY_DIMS = ModelDims(vae_scale_factor=8, size_multiple=64, latent_channels=4, unet_in_channels=4, text_hidden_size=32,
                      max_tokens=77, vocab_size=514, native_height=128, native_width=128)
TINY_SHAPES = {"batch": [1, 1, 4], "height": [64, 128, 256], "width": [64, 128, 256]}  # profiles/tiny.toml


def tiny_profile():
    profile = profile_from_dict("tiny", {"model": {"source": "builtin:tiny"}, "shapes": TINY_SHAPES})
    return bind_family(profile, tuple(component_specs(TINY_DIMS)), "unet")


def export_components(dims: ModelDims = TINY_DIMS) -> dict[str, dict]:
    """{component: the export record's inputs/outputs/precision/config/files}, as `kiln export tiny` writes them."""
    profile = tiny_profile()
    records = {}
    for name, spec in component_specs(dims).items():
        ranges = tensor_ranges(spec, profile, dims)
        records[name] = {
            "onnx": f"{name}/model.onnx",
            "files": {"model.onnx": "0" * 64},
            "inputs": [{"name": t.name, "dtype": t.dtype, "dims": list(t.dims), **ranges[t.name]} for t in spec.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "dims": list(t.dims), **ranges[t.name]} for t in spec.outputs],
            "config": {},
            "precision": "fp32",
        }
    return records


def component_info(name: str) -> ComponentInfo:
    return ComponentInfo.from_dict(name, component_entry(export_components()[name], file=f"{name}.onnx"))


def write_artifact(folder: Path, backend: dict, suffix: str, names=None, family: str | None = None):
    """An artifact folder with stand-in engine files (each holds its component's name) and a real
    manifest listing them; returns the loaded Manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    exported = export_components()
    components = {}
    for name in names or exported:
        (folder / f"{name}{suffix}").write_bytes(name.encode())
        components[name] = component_entry(exported[name], file=f"{name}{suffix}", build_seconds=0.0)
    export = {"export_key": "0" * 64, "exporter": {"name": "dynamo"}, "dims": TINY_DIMS.to_dict(),
              "profile": tiny_profile().to_dict(),
              "model": {"source": "builtin:tiny", "pipeline_class": "StableDiffusionPipeline",
                        "weights_sha256": "0" * 64, **({"family": family} if family else {})}}
    write_manifest(folder, manifest_record(export, backend=backend, components=components, build_key="0" * 64))
    return load_manifest(folder)
