"""VAE slicing and tiling on engines, blended exactly as diffusers' AutoencoderKL blends them.

Tiling cuts the input into overlapping square tiles (diffusers' geometry: tile side T, stride
int(T * (1 - overlap)), the last tiles cut short at the border), runs the engine on each, blends
each tile into its upper and left neighbours over int(T_out * overlap) rows and columns with
diffusers' own blend_v/blend_h, and keeps T_out - blend of each. Every tile must fit the engine's
built range, which is checked for the whole plan before anything runs; where diffusers' tile
would make one that does not, the input runs untiled if the engine takes it whole, else the tile
closest to diffusers' that fits and stitches exactly (choose_tile)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from runtime.errors import ShapeError
from runtime.manifest import ComponentInfo

DEFAULT_OVERLAP = 0.25  # diffusers' tile_overlap_factor


def tile_starts(size: int, tile: int, overlap: float) -> range:
    """Where tiles start along one side (diffusers': every int(tile * (1 - overlap)))."""
    return range(0, size, max(1, int(tile * (1 - overlap))))


def tile_shapes(height: int, width: int, tile: int, overlap: float) -> set[tuple[int, int]]:
    """Every (height, width) a tile of this plan has, in the input's units."""
    return {(min(tile, height - i), min(tile, width - j))
            for i in tile_starts(height, tile, overlap) for j in tile_starts(width, tile, overlap)}


def choose_tile(info: ComponentInfo, batch: int, height: int, width: int, tile: int, overlap: float,
                out_of: Callable[[int], int]) -> int | None:
    """The tile side to cut an input of height x width into for `info`'s engine: `tile` where every
    tile of its plan lies in the engine's range (diffusers' own tiles, exactly). Where one would not
    (diffusers' tile larger than the engine takes, or its last row cut short below the engine's
    minimum): None when the whole input fits the engine (run it untiled), else the tile closest to
    `tile` whose plan fits and whose stride stitches exactly (stride x out_of(t) / t == the part of
    each output tile kept, out_of(t) - int(out_of(t) * overlap)). Raises ShapeError, before anything
    runs, where none does."""
    tensor = info.inputs[0]
    lo, hi = tensor.min[2:], tensor.max[2:]

    def bad(t: int) -> list[tuple[int, int]]:
        shapes = tile_shapes(height, width, t, overlap)
        return sorted(s for s in shapes if not (lo[0] <= s[0] <= hi[0] and lo[1] <= s[1] <= hi[1]))

    def stitches(t: int) -> bool:
        out = out_of(t)
        return int(t * (1 - overlap)) * out == (out - int(out * overlap)) * t

    def checked(t: int | None) -> int | None:
        side = (height, width) if t is None else (min(t, height), min(t, width))
        info.output_shapes({tensor.name: (batch, tensor.dims[1], *side)})  # the batch too
        return t

    if not bad(tile):
        return checked(tile)
    if lo[0] <= height <= hi[0] and lo[1] <= width <= hi[1]:
        return checked(None)
    fitting = [t for t in range(1, max(hi) + 1) if stitches(t) and not bad(t)]
    if fitting:
        return checked(min(fitting, key=lambda t: (abs(t - tile), t)))
    raise ShapeError(f"{info.name}: no tile size cuts {height}x{width} into tiles inside the engine's {tensor.name} range "
                     f"{lo[0]}x{lo[1]}..{hi[0]}x{hi[1]} (tiles of {tile}, overlap {overlap:g}, would be "
                     f"{', '.join(f'{h}x{w}' for h, w in bad(tile))}). Rebuild with a lower minimum for it "
                     f"([shapes.{info.name}] height/width), or request another size", field="height")


def tiled(x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor], tile_in: int, tile_out: int,
          overlap: float) -> torch.Tensor:
    """Run `run` on overlapping tiles of x (side tile_in) whose outputs have side tile_out, blended
    and stitched as diffusers' tiled_decode/_tiled_encode do."""
    from diffusers import AutoencoderKL

    blend_extent = int(tile_out * overlap)
    row_limit = tile_out - blend_extent
    rows = [[run(x[:, :, i:i + tile_in, j:j + tile_in]).clone() for j in tile_starts(x.shape[3], tile_in, overlap)]
            for i in tile_starts(x.shape[2], tile_in, overlap)]
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, tile in enumerate(row):  # blend the tile above and the tile to the left into this one
            if i > 0:
                tile = AutoencoderKL.blend_v(None, rows[i - 1][j], tile, blend_extent)
            if j > 0:
                tile = AutoencoderKL.blend_h(None, row[j - 1], tile, blend_extent)
            result_row.append(tile[:, :, :row_limit, :row_limit])
        result_rows.append(torch.cat(result_row, dim=3))
    out = torch.cat(result_rows, dim=2)
    expected = tuple(side * tile_out // tile_in for side in x.shape[2:])
    if tuple(out.shape[2:]) != expected:  # a tile whose stride does not stitch (diffusers' own, configured so)
        raise ShapeError(f"tiles of {tile_in} (overlap {overlap:g}) stitch {tuple(x.shape[2:])} into {tuple(out.shape[2:])}, "
                         f"not {expected}: choose a tile whose stride x {tile_out}/{tile_in} is the part of each output "
                         f"tile kept ({tile_out - blend_extent})")
    return out


def sliced(x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One image at a time (diffusers' VAE slicing)."""
    return torch.cat([run(one).clone() for one in x.split(1)])


def tile_above_the_vae(pipe) -> bool:
    """For services, which accept every size the UNet was built for ([shapes]): where the VAE decoder
    engine was built smaller ([shapes.vae_decoder]), turn tiling on so those sizes decode. True if it did."""
    import logging

    if not hasattr(getattr(getattr(pipe, "vae", None), "decoder", None), "info"):  # not an engine VAE (a test stand-in)
        return False
    latent = pipe.vae.decoder.info.inputs[0]
    f = pipe.vae.factor
    (_, _, max_h), (_, _, max_w) = pipe.manifest.shape_range("height"), pipe.manifest.shape_range("width")
    if max_h <= latent.max[2] * f and max_w <= latent.max[3] * f:
        return False
    pipe.enable_vae_tiling()
    logging.getLogger(__name__).info("VAE tiling on: the VAE decoder engine takes up to %dx%d, requests up to %dx%d",
                                     latent.max[2] * f, latent.max[3] * f, max_h, max_w)
    return True
