"""The shape of manifest.json and report.json, checked once on load: every problem is collected
and reported together (field, expected, found), so that a damaged or hand-edited artifact is one
ArtifactError and never a KeyError deep inside the runtime."""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from runtime.shapes import parse_dim

Problems = list[tuple[str, str, str]]
DTYPES = ("float32", "float16", "bfloat16", "int8", "uint8", "int32", "int64", "bool")
PRECISIONS = ("fp32", "fp16", "int8")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _found(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(problems: Problems, where: str, value: Any, ok: bool, expected: str) -> bool:
    if not ok:
        problems.append((where, expected, "missing" if value is _MISSING else _found(value)))
    return ok


_MISSING = object()


def _table(problems: Problems, parent: Mapping, key: str, where: str, optional: bool = False) -> Mapping | None:
    value = parent.get(key, _MISSING)
    if value is _MISSING and optional:
        return None
    return value if _expect(problems, where, value, isinstance(value, Mapping), "an object") else None


def _fields(problems: Problems, table: Mapping | None, where: str, checks: Mapping[str, tuple[Callable, str]],
            optional: tuple[str, ...] = ()) -> None:
    if table is None:
        return
    for key, (ok, expected) in checks.items():
        value = table.get(key, _MISSING)
        if value is _MISSING and key in optional:
            continue
        _expect(problems, f"{where}.{key}", value, value is not _MISSING and ok(value), expected)


def _str(value) -> bool:
    return isinstance(value, str) and bool(value)


def _positive(value) -> bool:
    return _is_int(value) and value > 0


def _int_list(value, length: int | None = None) -> bool:
    return isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value) and (length is None or len(value) == length)


def _range(value) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(_positive(v) for v in value) and value[0] <= value[1] <= value[2]


def _dims(value) -> bool:
    if not isinstance(value, list):
        return False
    try:
        for dim in value:
            if isinstance(dim, bool) or not isinstance(dim, (int, str)):
                return False
            parse_dim(dim)
    except ValueError:
        return False
    return True


def _tensor(problems: Problems, t: Any, where: str) -> None:
    if not _expect(problems, where, t, isinstance(t, Mapping), "an object"):
        return
    _fields(problems, t, where, {"name": (_str, "a name"), "dtype": (lambda v: v in DTYPES, f"one of {list(DTYPES)}"),
                                 "dims": (_dims, "a list of ints and axis expressions ('axis', 'K*axis', 'axis/K')")})
    rank = len(t["dims"]) if isinstance(t.get("dims"), list) else None
    for key in ("min", "opt", "max"):
        value = t.get(key, _MISSING)
        _expect(problems, f"{where}.{key}", value, _int_list(value, rank), f"{rank} non-negative ints" if rank else "ints")


def _refit_record(value) -> bool:
    """A LoRA refit record (runtime/refit.py): the module, the base weights file and the weight map."""
    if not (isinstance(value, Mapping) and _str(value.get("module")) and _str(value.get("weights"))
            and isinstance(value.get("params"), Mapping)):
        return False
    unused = value.get("unused", [])
    return isinstance(unused, list) and all(_str(p) for p in unused) and all(
        isinstance(v, list) and len(v) == 2 and _str(v[0]) and v[1] in ("same", "transpose")
        for v in value["params"].values())


def _component(problems: Problems, name: str, c: Any) -> None:
    where = f"components.{name}"
    if not _expect(problems, where, c, isinstance(c, Mapping), "an object"):
        return
    _fields(problems, c, where, {
        "file": (_str, "a relative path"),
        "files": (lambda v: isinstance(v, list) and all(_str(f) for f in v), "a list of relative paths"),
        "precision": (lambda v: v in PRECISIONS, f"one of {list(PRECISIONS)}"),
        "config": (lambda v: isinstance(v, Mapping), "an object"),
        "refit_onnx": (_str, "a relative path"),
        "refit": (_refit_record, "{module, weights: a relative path, params: {name: [engine name, 'same'|'transpose']}}"),
    }, optional=("refit_onnx", "refit"))
    for kind in ("inputs", "outputs"):
        tensors = c.get(kind, _MISSING)
        if _expect(problems, f"{where}.{kind}", tensors, isinstance(tensors, list) and bool(tensors), "a non-empty list"):
            for i, t in enumerate(tensors):
                _tensor(problems, t, f"{where}.{kind}[{i}]")


def manifest_problems(data: Any) -> Problems:
    """Every way `data` (parsed manifest.json) differs from the format this runtime reads."""
    problems: Problems = []
    if not isinstance(data, Mapping):
        return [("(manifest)", "a JSON object", type(data).__name__)]
    _fields(problems, data, "manifest", {"format_version": (_is_int, "an integer"), "kiln_version": (_str, "a version")})
    _fields(problems, _table(problems, data, "model", "model"), "model", {
        "source": (_str, "the model source"), "pipeline_class": (_str, "a diffusers pipeline class"),
        "weights_sha256": (lambda v: isinstance(v, str) and bool(_SHA256.match(v)), "64 hex digits"),
        "family": (_str, "a model family name")}, optional=("family",))
    profile = _table(problems, data, "profile", "profile")
    shapes = _table(problems, profile, "shapes", "profile.shapes") if profile is not None else None
    _fields(problems, shapes, "profile.shapes", {k: (_range, "[min, opt, max] positive, min <= opt <= max")
                                                 for k in ("batch", "height", "width")})
    own = _table(problems, profile, "component_shapes", "profile.component_shapes", optional=True) if profile else None
    for name, ranges in (own or {}).items():  # [shapes.COMPONENT]: a component's own height/width ranges
        if _expect(problems, f"profile.component_shapes.{name}", ranges, isinstance(ranges, Mapping), "an object"):
            _fields(problems, ranges, f"profile.component_shapes.{name}",
                    {k: (_range, "[min, opt, max] positive, min <= opt <= max") for k in ("height", "width")},
                    optional=("height", "width"))
            _expect(problems, f"profile.component_shapes.{name}", sorted(ranges), set(ranges) <= {"height", "width"},
                    "height and/or width")
    _fields(problems, _table(problems, data, "dims", "dims"), "dims", {
        "vae_scale_factor": (_positive, "a positive integer"), "size_multiple": (_positive, "a positive integer")})
    backend = _table(problems, data, "backend", "backend")
    _fields(problems, backend, "backend", {"name": (_str, "a backend name")})
    if backend is not None and backend.get("name") == "onnxruntime":
        _fields(problems, backend, "backend", {"execution_provider": (_str, "an execution provider")})
    if backend is not None and backend.get("name") == "tensorrt":
        _fields(problems, backend, "backend", {"version": (_str, "a TensorRT version"), "gpu": (_str, "a GPU name"),
                                               "compute_capability": (lambda v: _int_list(v, 2), "[major, minor]")})
    components = _table(problems, data, "components", "components")
    if components is not None:
        _expect(problems, "components", components, bool(components), "at least one component")
        for name, c in components.items():
            _component(problems, name, c)
    files = _table(problems, data, "files", "files")
    for rel, entry in (files or {}).items():
        where = f"files[{rel!r}]"
        if _expect(problems, where, entry, isinstance(entry, Mapping), "an object"):
            _fields(problems, entry, where, {
                "sha256": (lambda v: isinstance(v, str) and bool(_SHA256.match(v)), "64 hex digits"),
                "size": (lambda v: _is_int(v) and v >= 0, "a size in bytes")})
    return problems


def report_problems(data: Any) -> Problems:
    """Every way `data` (parsed report.json) differs from what `kiln inspect` reads."""
    if not isinstance(data, Mapping):
        return [("(report)", "a JSON object", type(data).__name__)]
    problems: Problems = []
    for key in ("export_parity", "engine_parity"):
        table = _table(problems, data, key, key, optional=True)
        for name, rows in (table or {}).items():
            ok = isinstance(rows, list) and all(isinstance(r, Mapping) and isinstance(r.get("max_abs_err"), (int, float))
                                                for r in rows)
            _expect(problems, f"{key}.{name}", rows, ok, "a list of rows with max_abs_err")
    quality = _table(problems, data, "quality", "quality", optional=True)
    if quality is not None:
        _table(problems, quality, "components", "quality.components", optional=True)
        pipeline = _table(problems, quality, "pipeline", "quality.pipeline", optional=True)
        _fields(problems, pipeline, "quality.pipeline", {
            "psnr_db": (lambda v: v is None or isinstance(v, (int, float)), "a number or null"),
            "per_image_psnr_db": (lambda v: isinstance(v, list), "a list"), "steps": (_positive, "a positive integer"),
            "size": (lambda v: _int_list(v, 2), "[height, width]")})
        judged = _table(problems, quality, "judged", "quality.judged", optional=True)
        for side in ("fp32", "exported") if judged is not None else ():
            _fields(problems, _table(problems, judged, side, f"quality.judged.{side}"), f"quality.judged.{side}", {
                "accuracy": (lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "a share, 0..1"),
                "frechet": (lambda v: isinstance(v, (int, float)), "a number"), "images": (_positive, "a positive integer")})
    return problems
