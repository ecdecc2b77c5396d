"""The artifact format: manifest.json, read and checked by the runtime (it must read it forever).

An artifact folder holds one engine per component, tokenizer/ and scheduler/ as saved by
diffusers, manifest.json and report.json. The manifest lists the sha256 of every other file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from runtime.errors import ArtifactError, ShapeError, format_table
from runtime.files import file_sha256
from runtime.shapes import bind_axes, eval_dims

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    dims: tuple
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorInfo":
        return cls(d["name"], d["dtype"], tuple(d["dims"]), tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]))


@dataclass(frozen=True)
class ComponentInfo:
    name: str
    file: str
    precision: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    config: Mapping[str, Any]
    refit_onnx: str | None = None  # TensorRT plans built with STRIP_PLAN: the ONNX their weights come from

    @classmethod
    def from_dict(cls, name: str, c: Mapping[str, Any]) -> "ComponentInfo":
        return cls(name=name, file=c["file"], precision=c["precision"],
                   inputs=tuple(TensorInfo.from_dict(t) for t in c["inputs"]),
                   outputs=tuple(TensorInfo.from_dict(t) for t in c["outputs"]),
                   config=c["config"], refit_onnx=c.get("refit_onnx"))

    def output_shapes(self, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Check concrete input shapes against the built ranges; return the output shapes."""
        axes = bind_axes({t.name: t.dims for t in self.inputs}, input_shapes)
        for t in self.inputs:
            shape = tuple(input_shapes[t.name])
            if any(s < lo or s > hi for s, lo, hi in zip(shape, t.min, t.max)):
                raise ShapeError(
                    f"{self.name}: input '{t.name}' has shape {list(shape)}, outside the range the engine was "
                    f"built for: min {list(t.min)}, max {list(t.max)}. Rebuild with a profile that covers it"
                )
        return {t.name: eval_dims(t.dims, axes) for t in self.outputs}


@dataclass(frozen=True)
class Manifest:
    folder: Path
    data: Mapping[str, Any]
    components: Mapping[str, ComponentInfo]

    @property
    def backend(self) -> Mapping[str, Any]:
        return self.data["backend"]

    @property
    def profile(self) -> Mapping[str, Any]:
        return self.data["profile"]

    @property
    def size_multiple(self) -> int:
        return int(self.data["dims"]["size_multiple"])

    def shape_range(self, key: str) -> tuple[int, int, int]:
        return tuple(self.profile["shapes"][key])


def load_manifest(folder: Path | str) -> Manifest:
    """Read manifest.json and check its format version and required fields."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{folder} is not an artifact folder: it has no {MANIFEST_FILE}. Build one with `kiln build MODEL --out DIR`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the artifact is damaged, rebuild it") from exc
    version = data.get("format_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{path} has no integer format_version; found {version!r}. Rebuild the artifact")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} is artifact format version {version}, newer than this kiln reads (up to {FORMAT_VERSION}). "
            f"Upgrade kiln (this is {data.get('kiln_version', '?')}'s format) or rebuild with this version"
        )
    missing = [k for k in ("backend", "profile", "dims", "components", "files") if k not in data]
    if missing:
        raise ArtifactError(f"{path} lacks required fields {missing}; the artifact is damaged, rebuild it")
    return manifest_from_dict(folder, data)


def manifest_from_dict(folder: Path, data: Mapping[str, Any]) -> Manifest:
    """A Manifest over `folder` from manifest data (no file checks)."""
    components = {name: ComponentInfo.from_dict(name, c) for name, c in data["components"].items()}
    return Manifest(folder=folder, data=data, components=components)


def verify_files(manifest: Manifest) -> None:
    """Every file the manifest lists must exist with its recorded size and sha256."""
    problems = []
    for rel, entry in manifest.data["files"].items():
        path = manifest.folder / rel
        if not path.is_file():
            problems.append((rel, "present", "missing"))
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append((rel, f"{entry['size']} bytes", f"{size} bytes (truncated or replaced)"))
        elif file_sha256(path) != entry["sha256"]:
            problems.append((rel, f"sha256 {entry['sha256'][:12]}…", "different content (altered)"))
    if problems:
        raise ArtifactError(
            f"{manifest.folder} failed its checksum check:\n" + format_table(["file", "expected", "found"], problems)
            + "\nThe artifact was damaged after it was built; copy it again or rebuild it"
        )


def file_entries(folder: Path, relpaths: list[str]) -> dict[str, dict[str, Any]]:
    """{relpath: {"sha256", "size"}} for the manifest's `files` table."""
    return {rel: {"sha256": file_sha256(folder / rel), "size": (folder / rel).stat().st_size} for rel in sorted(relpaths)}
