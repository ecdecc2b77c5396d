"""Tensor dimension expressions, the shape language of the manifest.

A dimension is an int (fixed) or an expression "axis" / "K*axis" / "axis/K" over named axes
such as batch, unet_batch, latent_height ("latent_height/4": a UNet level two downsamplers deep,
where the size multiple makes the division exact). Concrete input shapes bind the axes; output shapes and range
checks follow from the same expressions, so every backend and the runtime agree.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from runtime.errors import ShapeError

Dim = int | str
_EXPR = re.compile(r"^(?:(\d+)\*)?([a-z_][a-z0-9_]*)(?:/(\d+))?$")


def parse_dim(dim: Dim) -> tuple[int, str | None]:
    """Return (scale, axis); a fixed dimension is (value, None). (See parse_ratio for "axis/K".)"""
    scale, axis, _ = parse_ratio(dim)
    return scale, axis


def parse_ratio(dim: Dim) -> tuple[int, str | None, int]:
    """Return (scale, axis, divisor): the dimension is scale * axis / divisor; fixed: (value, None, 1)."""
    if isinstance(dim, int):
        return dim, None, 1
    match = _EXPR.match(dim)
    if not match or (match.group(1) and match.group(3)) or match.group(3) == "0":
        raise ValueError(f"bad dimension expression {dim!r}; expected 'axis', 'K*axis' or 'axis/K'")
    return int(match.group(1) or 1), match.group(2), int(match.group(3) or 1)


def eval_dims(dims: Sequence[Dim], axes: Mapping[str, int]) -> tuple[int, ...]:
    """Concrete shape of `dims` for the axis values `axes` ("axis/K" rounds down)."""
    out = []
    for dim in dims:
        scale, axis, divisor = parse_ratio(dim)
        out.append(scale if axis is None else scale * axes[axis] // divisor)
    return tuple(out)


def bind_axes(tensors: Mapping[str, Sequence[Dim]], shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Solve axis values from concrete input shapes; inconsistent or ill-fitting shapes raise ShapeError."""
    axes: dict[str, int] = {}
    for name, dims in tensors.items():
        shape = tuple(shapes[name])
        if len(shape) != len(dims):
            raise ShapeError(f"input '{name}' must have {len(dims)} dimensions {list(dims)}, got shape {list(shape)}")
        for dim, size in zip(dims, shape):
            scale, axis, divisor = parse_ratio(dim)
            if axis is None:
                if size != scale:
                    raise ShapeError(f"input '{name}' must have shape {list(dims)}, got {list(shape)}")
                continue
            if size % scale:
                raise ShapeError(f"input '{name}': dimension {dim!r} must be a multiple of {scale}, got {size}")
            value = size // scale * divisor
            if axes.setdefault(axis, value) != value:
                raise ShapeError(
                    f"input '{name}': axis '{axis}' is {value} here but {axes[axis]} in another input; "
                    "inputs of one call must agree"
                )
    return axes
