"""How ControlNet components and their residual tensors are named, for the exporter and the runtime
alike (no heavy imports): controlnet_0, controlnet_1, ... in the order they were given, each
returning down_residual_0..N-1 and mid_residual, which the UNet takes as inputs of the same names."""
from __future__ import annotations

import re
from collections.abc import Iterable

PREFIX = "controlnet_"
MID_RESIDUAL = "mid_residual"
MAX_CONTROLNETS = 8
_NAME = re.compile(r"^controlnet_(\d+)$")


def controlnet_names(count: int) -> tuple[str, ...]:
    return tuple(f"{PREFIX}{i}" for i in range(count))


def down_residual(i: int) -> str:
    return f"down_residual_{i}"


def is_controlnet(component: str) -> bool:
    return bool(_NAME.match(component))


def controlnets_in(components: Iterable[str]) -> tuple[str, ...]:
    """The ControlNet components among `components`, in their order (controlnet_0 first)."""
    return tuple(sorted((c for c in components if is_controlnet(c)), key=lambda c: int(_NAME.match(c).group(1))))
