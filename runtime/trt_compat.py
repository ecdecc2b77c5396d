"""Can this machine run a TensorRT artifact? Pure decisions over the manifest's backend record and
what the machine reports, taken before any engine is deserialized (TensorRT's own failure is a
log line and a None, not an explanation)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from runtime.errors import ArtifactError

# TensorRT's HardwareCompatibilityLevel, as the manifest spells it.
HARDWARE_LEVELS = ("none", "same-compute-capability", "ampere-plus")
AMPERE = (8, 0)


@dataclass(frozen=True)
class TrtDevice:
    """What an engine's compatibility depends on: the TensorRT library and the GPU."""

    trt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]


def version_key(version: str) -> tuple[int, ...]:
    """'11.4.0.106' and '11.4.0.106.post1' → (11, 4, 0, 106): engines are tied to the library
    build, while a packaging suffix changes nothing inside it."""
    parts = re.findall(r"\d+", version.split("post")[0])
    if not parts:
        raise ArtifactError(f"cannot read TensorRT version {version!r}; expected a dotted number such as 11.4.0.106")
    return tuple(int(p) for p in parts[:4])


def capability(value) -> tuple[int, int]:
    """[8, 6], (8, 6) or '8.6' → (8, 6)."""
    if isinstance(value, str):
        major, _, minor = value.partition(".")
        return int(major), int(minor or 0)
    major, minor = value
    return int(major), int(minor)


def check_compatible(built: Mapping, here: TrtDevice) -> list[str]:
    """Raise ArtifactError if engines described by `built` (the manifest's backend record) cannot
    run on `here`, naming both sides; return warnings for differences that only cost speed."""
    problems, warnings = [], []
    if version_key(built["version"]) != version_key(here.trt_version):
        problems.append(
            f"it was built with TensorRT {built['version']} and this machine has TensorRT {here.trt_version} "
            "(TensorRT engines run only on the TensorRT build that made them)"
        )
    level = built.get("hardware_compatibility_level", "none")
    if level not in HARDWARE_LEVELS:
        raise ArtifactError(f"unknown hardware_compatibility_level {level!r} in the manifest; expected one of "
                            f"{', '.join(HARDWARE_LEVELS)}. Upgrade kiln or rebuild the artifact")
    cc_built, cc_here = capability(built["compute_capability"]), here.compute_capability
    if level == "ampere-plus":
        if cc_here < AMPERE:
            problems.append(f"it was built hardware-compatible for Ampere and newer (compute capability 8.0+), and "
                            f"this GPU ({here.gpu_name}) is compute capability {_cc(cc_here)}")
    elif cc_built != cc_here:
        problems.append(
            f"it was built for compute capability {_cc(cc_built)} ({built.get('gpu', '?')}) and this GPU "
            f"({here.gpu_name}) is compute capability {_cc(cc_here)}"
        )
    if problems:
        raise ArtifactError(
            "this TensorRT artifact cannot run here: " + "; and ".join(problems)
            + ". Rebuild it on this machine (`kiln build MODEL --backend tensorrt`), or build with "
            "--hardware-compat ampere-plus for engines that move between GPU generations"
        )
    if level == "none" and built.get("gpu") and built["gpu"] != here.gpu_name:
        warnings.append(f"engines were tuned on {built['gpu']} and run on {here.gpu_name} (same compute capability "
                        f"{_cc(cc_here)}): they work, but a rebuild here may be faster")
    return warnings


def _cc(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"
