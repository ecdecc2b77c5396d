"""Build an artifact folder from an export folder (or a MODEL, exporting first), atomically and
only when the inputs changed: a content hash of the inputs, not file existence, decides."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engines import ort_backend, trt_backend
from engines.select import BACKENDS, choose_backend
from engines.trt_backend import TrtOptions
from runtime.errors import ArtifactError, BuildError, ToleranceError, format_table
from runtime.files import atomic_folder, file_sha256, output_lock, refuse_foreign, temp_sibling
from runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    REPORT_FILE,
    component_entry,
    load_manifest,
    manifest_record,
    verify_files,
    write_manifest,
)
from runtime.numerics import COSINE_GATES, cosine, max_abs_err, tolerance
from runtime.version import __version__

log = logging.getLogger(__name__)

ENGINE_SUFFIX = {"onnxruntime": ".onnx", "tensorrt": ".plan"}


@dataclass(frozen=True)
class BuildOptions:
    """backend: "auto" (TensorRT on a GPU when it imports, else ONNX Runtime), "onnxruntime" or
    "tensorrt"; device: None (the backend's natural one), "cpu" or "cuda" (onnxruntime's
    execution provider); tensorrt: how TensorRT builds (ignored by onnxruntime)."""

    backend: str = "auto"
    device: str | None = None
    force: bool = False
    tensorrt: TrtOptions = TrtOptions()
    timing_cache_dir: Path | None = None  # TensorRT timing caches; default $KILN_CACHE_DIR/tensorrt
    # "refit": engines whose LoRA-loadable weights are swapped at run time (runtime/refit.py), on
    # every backend; "identical" (TensorRT): refit only with the build's own weights (stripped plans)
    refit: str = "off"

    def __post_init__(self):
        if self.refit not in ("off", "refit", "identical"):
            raise BuildError(f"refit must be off, refit or identical, got {self.refit!r}")
        if self.backend not in ("auto", *BACKENDS):
            raise BuildError(f"unknown backend {self.backend!r}; choose auto, {', '.join(BACKENDS)}")
        if self.device not in (None, "cpu", "cuda"):
            raise BuildError(f"device must be cpu or cuda, got {self.device!r}")


def resolve_options(options: BuildOptions) -> BuildOptions:
    """`options` with "auto" and an unset device made concrete; says what was picked and why."""
    if options.refit == "off" and options.tensorrt.refit != "off":  # one refit mode, set on either
        options = replace(options, refit=options.tensorrt.refit)
    elif options.refit != options.tensorrt.refit:
        options = replace(options, tensorrt=replace(options.tensorrt, refit=options.refit))
    if options.backend != "auto" and options.device is not None:
        return options
    choice = choose_backend(options.backend, options.device)
    if options.backend == "auto":
        log.info("backend: %s on %s (%s)", choice.backend, choice.device, choice.reason)
    return replace(options, backend=choice.backend, device=choice.device)


@dataclass(frozen=True)
class BuildResult:
    folder: Path
    skipped: bool
    build_key: str


def backend_identity(options: BuildOptions) -> dict[str, Any]:
    """What engines built with `options` (resolved) depend on: the build key's and manifest's record."""
    if options.backend == "tensorrt":
        return trt_backend.identity(options.tensorrt)
    return ort_backend.identity(ort_backend.OrtTarget(options.device), options.refit)


def int8_target(options: BuildOptions) -> str:
    """The int8 recipe that suits the build target: U8S8 for ONNX Runtime on CPU, else TensorRT's."""
    options = resolve_options(options)
    return "ort-cpu" if options.backend == "onnxruntime" and options.device == "cpu" else "tensorrt"


def check_precisions(options: BuildOptions, components: dict) -> None:
    """Refuse, before any work, a component precision the target cannot build."""
    for name, entry in components.items():
        if options.backend == "tensorrt":
            trt_backend.check_precision(name, entry["precision"], entry)
        else:
            ort_backend.check_precision(ort_backend.OrtTarget(options.device), name, entry["precision"])


def build_key(export_key: str, backend: dict[str, Any]) -> str:
    identity = {"export": export_key, "backend": backend, "format": FORMAT_VERSION, "kiln": __version__}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def up_to_date(out_dir: Path, key: str) -> bool:
    """True when `out_dir` holds an intact artifact built from the same inputs."""
    try:
        manifest = load_manifest(out_dir)
        if manifest.data.get("build_key") != key:
            return False
        verify_files(manifest)
    except ArtifactError:
        return False
    return True


def build_from_model(model: str, out_dir: Path, options: BuildOptions = BuildOptions(),
                     profile_path: str | Path | None = None, export_options=None) -> BuildResult:
    """MODEL → export into a temporary folder → artifact. Skipped when weights, profile, tool
    versions and backend are unchanged."""
    from exporters.export import ExportOptions, export_key, export_model
    from exporters.resolve import resolve_model

    out_dir = Path(out_dir)
    refuse_foreign(out_dir, MANIFEST_FILE, "artifact")  # before any work: a user's folder is never replaced
    options = resolve_options(options)
    export_options = export_options or ExportOptions(int8_target=int8_target(options))
    if options.refit == "refit" and not export_options.refit:
        export_options = replace(export_options, refit=True)
    source, profile = resolve_model(model, profile_path)
    ekey = export_key(source, profile, export_options)
    key = build_key(ekey, backend_identity(options))
    if not options.force and up_to_date(out_dir, key):
        log.debug("%s is up to date (build key %s); nothing to do", out_dir, key[:12])  # the caller says so, once
        return BuildResult(out_dir, True, key)
    with output_lock(out_dir):  # held through export and build; removes what killed runs left
        tmp = temp_sibling(out_dir.resolve(), "export")
        try:
            export_dir = export_model(source, profile, tmp / "export", export_options, key=ekey)
            return build_from_export(export_dir, out_dir, options)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def build_from_export(export_dir: Path, out_dir: Path, options: BuildOptions = BuildOptions()) -> BuildResult:
    """A `kiln export` folder → artifact folder, written atomically."""
    from exporters.export import read_export

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    keep = refuse_foreign(out_dir, MANIFEST_FILE, "artifact")  # a user's own files in an old artifact stay
    export = read_export(export_dir)
    options = resolve_options(options)
    check_precisions(options, export["components"])
    backend = backend_identity(options)
    if options.refit == "refit" and not any("refit" in c for c in export["components"].values()):
        raise BuildError(f"{export_dir} was not exported refittable, so --refit refit has no weights to swap; "
                         "re-export it with `kiln export MODEL --refit refit`, or build from the MODEL")
    key = build_key(export["export_key"], backend)
    if not options.force and up_to_date(out_dir, key):
        log.debug("%s is up to date (build key %s); nothing to do", out_dir, key[:12])  # the caller says so, once
        return BuildResult(out_dir, True, key)
    _verify_export(export_dir, export)  # hashes every graph: only when something will be built from them
    components, engine_parity = {}, {}
    names = list(export["components"])
    with atomic_folder(out_dir, needed_bytes=_build_bytes(export_dir, export, backend), keep=keep) as tmp:
        for i, name in enumerate(names, 1):
            entry = export["components"][name]
            started = time.perf_counter()
            log.info("[%d/%d] %s: building %s %s engine (%s)", i, len(names), name, entry["precision"], options.backend,
                     backend.get("execution_provider") or backend.get("gpu"))
            engine_file = f"{name}{ENGINE_SUFFIX[options.backend]}"
            files = _engine_from_onnx(export_dir / entry["onnx"], tmp / engine_file, entry, options, backend)
            refit_onnx = _carry_refit_weights(export_dir, entry, tmp, name) if backend.get("strip_plan") else None
            lora_refit = _carry_base_weights(export_dir, entry, tmp, name) if options.refit == "refit" else None
            seconds = time.perf_counter() - started
            components[name] = component_entry(entry, file=engine_file, files=[p.relative_to(tmp).as_posix() for p in files],
                                               build_seconds=seconds, refit_onnx=refit_onnx, refit=lora_refit)
            engine_parity[name] = _engine_parity(tmp, name, components[name], export_dir / entry["reference"], entry, backend)
            log.info("[%d/%d] %s: built in %.1f s, engine vs PyTorch max |err| %.3g", i, len(names), name, seconds,
                     max(r["max_abs_err"] for r in engine_parity[name]))
        for folder in export.get("assets", ("tokenizer", "scheduler")):
            shutil.copytree(export_dir / folder, tmp / folder)
        report = {
            "export_parity": {n: export["components"][n]["parity"] for n in names},
            "engine_parity": engine_parity,
            "quality": {
                "components": {n: {"precision": c["precision"], **c.get("quality", {})} for n, c in export["components"].items()},
                **export.get("quality", {}),
            },
        }
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
        write_manifest(tmp, manifest_record(export, backend=backend, components=components, build_key=key))
    log.debug("wrote %s", out_dir)
    return BuildResult(out_dir, False, key)


def _build_bytes(export_dir: Path, export: dict, backend: dict) -> int:
    """Room an artifact needs: about its export's size (engines are about their graphs' size), twice
    that when stripped plans ship their ONNX weights too."""
    graphs = sum((export_dir / name / f).stat().st_size for name, c in export["components"].items() for f in c["files"])
    return int(graphs * (2.2 if backend.get("strip_plan") else 1.1)) + 2**20


def _engine_from_onnx(onnx: Path, out: Path, entry: dict, options: BuildOptions, backend: dict) -> list[Path]:
    if options.backend == "tensorrt":
        return trt_backend.engine_from_onnx(onnx, out, entry["inputs"], options.tensorrt, backend, options.timing_cache_dir)
    return ort_backend.engine_from_onnx(onnx, out, ort_backend.OrtTarget(options.device), entry["precision"],
                                        options.refit if "refit" in entry else "off")


def _carry_base_weights(export_dir: Path, entry: dict, folder: Path, name: str) -> dict | None:
    """A refittable component's base weights, copied to refit/<name>.safetensors, and its record
    for the manifest (the export's, naming that file)."""
    record = entry.get("refit")
    if record is None:
        return None
    (folder / "refit").mkdir(exist_ok=True)
    shutil.copy2((export_dir / entry["onnx"]).parent / record["weights"], folder / "refit" / f"{name}.safetensors")
    return {**record, "weights": f"refit/{name}.safetensors"}


def _carry_refit_weights(export_dir: Path, entry: dict, folder: Path, name: str) -> str:
    """A stripped plan has no weights: ship the component's ONNX (and its external data) so the
    runtime can refit them at load. Returns the graph's path in the artifact."""
    src = (export_dir / entry["onnx"]).parent
    dst = folder / "weights" / name
    dst.mkdir(parents=True)
    for f in entry["files"]:
        if f.startswith("model.onnx"):  # the graph and its external data
            shutil.copy2(src / f, dst / f)
    return (dst / "model.onnx").relative_to(folder).as_posix()


def _open_engine(folder: Path, name: str, component: dict, backend: dict):
    """The engine just built, opened by the runtime's own loader for that backend."""
    from runtime.manifest import ComponentInfo

    info = ComponentInfo.from_dict(name, component)
    if backend["name"] == "tensorrt":
        from runtime.trt_engine import load_engines

        return load_engines(folder, backend, {name: info}, cuda_graphs=False)[name]
    from runtime.ort_engine import OrtEngine

    return OrtEngine(folder / component["file"], info, provider=backend["execution_provider"])


def _engine_parity(folder: Path, name: str, component: dict, reference: Path, entry: dict, backend: dict) -> list[dict]:
    """Run the new engine on the export's opt-shape reference inputs against PyTorch's outputs."""
    import numpy as np
    import torch

    engine = _open_engine(folder, name, component, backend)
    info = engine.info
    data = np.load(reference)
    out = engine(**{t.name: torch.from_numpy(data[t.name]) for t in info.inputs})
    rows = []
    atol, rtol = entry["tolerance"]["atol"], entry["tolerance"]["rtol"]
    for t in info.outputs:
        ref = data[t.name].astype(np.float64)
        got = out[t.name].cpu().numpy().astype(np.float64)
        row = {"point": "opt", "output": t.name, "shape": list(ref.shape),
               "max_abs_err": max_abs_err(got, ref), "cosine": cosine(got, ref)}
        if component["precision"] == "fp32":  # an fp32 engine must reproduce PyTorch
            row["tolerance"] = tolerance(atol, rtol, ref)
            row["ok"] = row["max_abs_err"] <= row["tolerance"]
        else:  # a lower-precision engine must stay above its quality gate
            row["min_cosine"] = COSINE_GATES[component["precision"]]
            row["ok"] = row["cosine"] >= row["min_cosine"]
        rows.append(row)
    if not all(r["ok"] for r in rows):
        raise ToleranceError(
            f"{name}: the {backend['name']} {component['precision']} engine disagrees with PyTorch:\n"
            + format_table(["output", "max |err|", "cosine", "required"],
                           [(r["output"], r["max_abs_err"], r["cosine"], r.get("tolerance", r.get("min_cosine"))) for r in rows])
        )
    return rows


def _verify_export(export_dir: Path, export: dict) -> None:
    problems = []
    expected = dict(export.get("files", {}))
    for name, entry in export["components"].items():
        expected.update({f"{name}/{f}": sha for f, sha in entry["files"].items()})
    for rel, sha in expected.items():
        path = export_dir / rel
        if not path.is_file():
            problems.append((rel, "present", "missing"))
        elif file_sha256(path) != sha:
            problems.append((rel, f"sha256 {sha[:12]}…", "different content"))
    if problems:
        raise BuildError(
            f"export folder {export_dir} is incomplete or altered:\n" + format_table(["file", "expected", "found"], problems)
            + "\nRe-run `kiln export`"
        )
