"""kiln's TensorRT code against the real TensorRT 11 bindings wheel (tensorrt-cu12-bindings on PyPI).

TensorRT cannot be imported on machines without its libraries, but its bindings wheel (1.3 MB)
holds the pybind11 module, whose string table names every class, method, property and enum member
it exports. This test reads those names and fails if the modules that drive TensorRT use an
attribute the wheel does not have, or one TensorRT 11 removed (design.md §6).

What this proves: every name exists somewhere in the API. What it cannot: that a name belongs to
the class it is called on, or that arguments are right; the gpu tests run the real library.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEEL = "tensorrt-cu12-bindings==11.4.0.106"
MODULES = [ROOT / "engines" / "trt_backend.py", ROOT / "runtime" / "trt_engine.py", ROOT / "runtime" / "trt_plumbing.py"]

# Attributes in those modules that belong to torch, the standard library or kiln itself, not TensorRT.
NOT_TENSORRT = {
    # torch
    "cuda", "current_device", "current_stream", "get_device_name", "get_device_capability", "is_available", "version",
    "empty", "uint8", "device", "data_ptr", "copy_", "contiguous", "to", "shape", "dtype", "replay", "graph",
    "CUDAGraph", "synchronize", "cuda_stream",
    # standard library and kiln
    "getLogger", "log", "info", "debug", "warning", "DEBUG", "INFO", "WARNING", "ERROR", "cache",
    "read_bytes", "write_bytes", "is_file", "parent", "name", "sub", "strip", "lower",
    "items", "values", "get", "append", "pop", "clear", "rsplit", "join",
    "inputs", "outputs", "max", "file", "output_shapes", "refit_onnx", "__init__",
}
# Gone in TensorRT 11 (strongly typed only) or replaced by _v2/_v3 APIs.
REMOVED = {"EXPLICIT_BATCH", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "platform_has_fast_fp16",
           "platform_has_fast_int8", "device_memory_size", "int8_calibrator", "IInt8Calibrator",
           "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator", "IInt8LegacyCalibrator", "execute_async_v2",
           "max_workspace_size"}
REMOVED_BUILDER_FLAGS = {"FP16", "INT8", "BF16", "FP8", "INT4", "FP4"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("tensorrt-wheel")
    cmd = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(dest)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip(f"could not fetch {WHEEL} from PyPI within 180 s")
    wheels = list(dest.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        pytest.skip(f"could not fetch {WHEEL} from PyPI (pip said: {(r.stderr or r.stdout).strip()[-300:]})")
    return wheels[0]


def api_names(wheel: Path) -> set[str]:
    """Every identifier the bindings export. The linker merges a string literal into the tail of a
    longer one ("Builder" lives inside "IExprBuilder"), so every suffix of an identifier counts."""
    names: set[str] = set()
    ident = re.compile(rb"^[A-Za-z_][A-Za-z0-9_]*$")
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            data = z.read(member)
            if member.endswith(".so"):
                for chunk in data.split(b"\0"):
                    if ident.match(chunk):
                        s = chunk.decode()
                        names.update(s[i:] for i in range(len(s)))
            elif member.endswith(".py"):  # the package's Python layer (e.g. __version__)
                for node in ast.walk(ast.parse(data)):
                    if isinstance(node, ast.Name):
                        names.add(node.id)
                    elif isinstance(node, ast.Attribute):
                        names.add(node.attr)
    return names


def used_attributes(source: str) -> tuple[set[str], set[str], set[tuple[str, str]]]:
    """(attributes used, names the module defines itself, (Enum, member) pairs of trt.X.Y)."""
    tree = ast.parse(source)
    used, own, chains = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            used.add(node.attr)
            if isinstance(node.value, ast.Attribute) and isinstance(node.value.value, ast.Name) and node.value.value.id == "trt":
                chains.add((node.value.attr, node.attr))
            if isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) and node.value.id == "self":
                own.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            own.add(node.target.id)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            used.add(node.args[1].value)
    return used, own, chains


def problems_in(source: str, api: set[str]) -> list[str]:
    used, own, chains = used_attributes(source)
    found = [f"{a}: not in the TensorRT 11 bindings" for a in sorted(used - own - NOT_TENSORRT) if a not in api]
    found += [f"{a}: removed in TensorRT 11" for a in sorted(used & REMOVED)]
    found += [f"BuilderFlag.{m}: removed in TensorRT 11 (precision comes from the graph)"
              for e, m in sorted(chains) if e == "BuilderFlag" and m in REMOVED_BUILDER_FLAGS]
    return found


def _flag_names(source: str) -> set[str]:
    """Builder flags kiln sets by name (TrtOptions.flags returns strings resolved with getattr)."""
    return set(re.findall(r'"(TF32|REFIT(?:_IDENTICAL)?|STRIP_PLAN|WEIGHT_STREAMING|[A-Z_]+PLUS|SAME_COMPUTE_CAPABILITY|NONE)"',
                          source))


def test_the_wheel_is_what_design_md_says(wheel):
    api = api_names(wheel)
    for present in ("set_tensor_address", "execute_async_v3", "device_memory_size_v2", "NATIVE_INSTANCENORM",
                    "WEIGHT_STREAMING", "REFIT_IDENTICAL", "STRIP_PLAN", "TF32", "USER_MANAGED", "weight_streaming_budget_v2"):
        assert present in api, present
    for gone in REMOVED:
        assert gone not in api, f"{gone} is still in the wheel; update REMOVED and design.md §6"


def test_kiln_uses_only_tensorrt_11_names(wheel):
    api = api_names(wheel)
    report, everything = [], set()
    for module in MODULES:
        source = module.read_text()
        everything |= used_attributes(source)[0]
        report += [f"{module.relative_to(ROOT)}: {p}" for p in problems_in(source, api)]
        report += [f"{module.relative_to(ROOT)}: flag {f} not in the bindings" for f in _flag_names(source) if f not in api]
    stale = NOT_TENSORRT - everything  # an exemption nobody uses only hides future mistakes
    assert not stale, f"remove unused NOT_TENSORRT entries: {sorted(stale)}"
    assert not report, "\n".join(report)


def test_the_check_catches_misspelled_and_removed_names(wheel):
    """The check itself can fail: a typo, a removed method and a removed precision flag."""
    api = api_names(wheel)
    bad = ("def f(context, config, engine):\n"
           "    context.set_tensor_adress('x', 0)\n"
           "    config.set_flag(trt.BuilderFlag.FP16)\n"
           "    return engine.device_memory_size\n")
    found = problems_in(bad, api)
    assert "set_tensor_adress: not in the TensorRT 11 bindings" in found
    assert "device_memory_size: removed in TensorRT 11" in found
    assert any(p.startswith("BuilderFlag.FP16") for p in found)
