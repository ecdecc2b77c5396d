"""The artifact format: manifest.json, written by the build and read by the runtime, here alone
(the runtime must read it forever, so the format lives with it).

An artifact folder holds one engine per component, the tokenizer and scheduler folders as saved by
diffusers, manifest.json and report.json. The manifest lists the sha256 of every other file. Its
component records come from the export's records through `component_entry`, the one place where
an export's description of a graph becomes the artifact's description of an engine.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from runtime.errors import ArtifactError, ShapeError, format_table
from runtime.files import file_sha256
from runtime.schema import manifest_problems, report_problems
from runtime.shapes import bind_axes, eval_dims
from runtime.version import __version__

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"
DEFAULT_FAMILY = "sd"  # artifacts of format 1 written before families were recorded hold SD pipelines
# An ONNX Runtime CPU record: what the exporter's quality pass runs its graphs on.
ORT_CPU_BACKEND = {"name": "onnxruntime", "execution_provider": "CPUExecutionProvider"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    dims: tuple
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorInfo:
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
    def from_dict(cls, name: str, c: Mapping[str, Any]) -> ComponentInfo:
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
    def model(self) -> Mapping[str, Any]:
        return self.data["model"]

    @property
    def family(self) -> str:
        """The model family whose runtime module assembles the pipeline ("sd" when not recorded)."""
        return self.model.get("family", DEFAULT_FAMILY)

    @property
    def profile(self) -> Mapping[str, Any]:
        return self.data["profile"]

    @property
    def size_multiple(self) -> int:
        return int(self.data["dims"]["size_multiple"])

    def shape_range(self, key: str) -> tuple[int, int, int]:
        return tuple(self.profile["shapes"][key])


def load_manifest(folder: Path | str) -> Manifest:
    """Read manifest.json and check its format version and its whole schema (every problem at once)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{folder} is not an artifact folder: it has no {MANIFEST_FILE}. Build one with `kiln build MODEL --out DIR`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the artifact is damaged, rebuild it") from exc
    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} is artifact format version {version}, newer than this kiln reads (up to {FORMAT_VERSION}). "
            f"Upgrade kiln (this is {data.get('kiln_version', '?')}'s format) or rebuild with this version"
        )
    problems = manifest_problems(data)
    if problems:
        raise ArtifactError(f"{path} is not a manifest this kiln can read:\n"
                            + format_table(["field", "expected", "found"], problems[:30])
                            + (f"\n... and {len(problems) - 30} more" if len(problems) > 30 else "")
                            + "\nThe artifact is damaged or was edited by hand; rebuild it")
    return manifest_from_dict(folder, data)


def load_report(folder: Path | str) -> dict[str, Any]:
    """report.json ({} when the artifact has none), its shape checked like the manifest's."""
    path = Path(folder) / REPORT_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); the artifact is damaged, rebuild it") from exc
    problems = report_problems(data)
    if problems:
        raise ArtifactError(f"{path} is not a report this kiln can read:\n"
                            + format_table(["field", "expected", "found"], problems[:30]) + "\nRebuild the artifact")
    return data


def manifest_from_dict(folder: Path, data: Mapping[str, Any]) -> Manifest:
    """A Manifest over `folder` from manifest data (no file checks)."""
    components = {name: ComponentInfo.from_dict(name, c) for name, c in data["components"].items()}
    return Manifest(folder=folder, data=data, components=components)


def verify_files(manifest: Manifest) -> None:
    """Every file the manifest lists must lie inside the folder and exist with its recorded size and
    sha256 (nothing outside the folder is opened)."""
    from runtime.files import path_problem

    problems = []
    for rel, entry in manifest.data["files"].items():
        path = manifest.folder / rel
        if (why := path_problem(manifest.folder, rel)):
            problems.append((rel, "a relative path inside the folder", why))
        elif not path.is_file():
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


# ---- writing ------------------------------------------------------------------------------------


def component_entry(export_entry: Mapping[str, Any], *, file: str, files: list[str] | None = None,
                    build_seconds: float | None = None, refit_onnx: str | None = None,
                    refit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest's record of one engine, from the export's record of the graph it was built
    from (`file`: the engine, relative to the folder the manifest describes)."""
    lowering = {k: export_entry[k] for k in ("int8", "fp16") if k in export_entry}
    return {
        "file": file,
        "files": list(files) if files is not None else [file],
        **({"refit_onnx": refit_onnx} if refit_onnx else {}),
        **({"refit": dict(refit)} if refit else {}),
        "precision": export_entry["precision"],
        **lowering,
        "onnx_sha256": export_entry["files"]["model.onnx"],
        "inputs": export_entry["inputs"],
        "outputs": export_entry["outputs"],
        "config": export_entry["config"],
        **({"export_seconds": export_entry["export_seconds"]} if "export_seconds" in export_entry else {}),
        **({"build_seconds": round(build_seconds, 2)} if build_seconds is not None else {}),
    }


def manifest_record(export: Mapping[str, Any], *, backend: Mapping[str, Any], components: Mapping[str, Mapping],
                    build_key: str | None = None) -> dict[str, Any]:
    """Everything manifest.json says but the files table: the export's model, profile, dims and
    exporter, the backend record and the component records (see `component_entry`)."""
    return {
        "format_version": FORMAT_VERSION,
        "kiln_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_key": build_key,
        "export_key": export["export_key"],
        "model": {"family": DEFAULT_FAMILY, **export["model"]},
        "profile": export["profile"],
        "dims": export["dims"],
        "exporter": export["exporter"],
        "backend": dict(backend),
        "components": {name: dict(c) for name, c in components.items()},
    }


def write_manifest(folder: Path, record: Mapping[str, Any]) -> Manifest:
    """Write `folder`/manifest.json: `record` plus the size and sha256 of every other file there."""
    folder = Path(folder)
    listed = [rel for rel in (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if rel != MANIFEST_FILE]
    data = {**record, "files": file_entries(folder, listed)}
    (folder / MANIFEST_FILE).write_text(json.dumps(data, indent=2), encoding="utf-8")
    return manifest_from_dict(folder, data)
