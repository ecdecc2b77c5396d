"""`kiln bench DIR --vae-tiling`: the peak memory of one VAE decode at the decoder engine's largest
size, untiled, against tiled decoding of an image twice that size on each side (and untiled at
the largest size with slicing, for a batch). Each case runs in a fresh child process, so that no
case inherits another's allocator arena: peak memory is the child's peak (RSS on CPU, the CUDA
allocator's peak on a GPU) above what it held once the engine was loaded and the latents made."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from kiln.bench.run import BenchError


def _child(folder: str, height: int, width: int, batch: int, tiling: bool, slicing: bool) -> dict:
    """One decode in this process: its peak memory above the loaded engine, and its seconds."""
    import torch

    from kiln.bench.measure import PeakMemory, synchronize
    from runtime.integrity import check_artifact
    from runtime.manifest import load_manifest
    from runtime.pipeline import open_engines
    from runtime.shims import VaeShim

    manifest = load_manifest(folder)
    check_artifact(manifest, ["vae_decoder"], assets=(), verify=False)
    decoder = open_engines(manifest, ["vae_decoder"])["vae_decoder"]
    vae = VaeShim(decoder, None, manifest.components["vae_decoder"].config, decoder.device)
    device = vae.device
    f = vae.factor
    z = torch.randn(batch, vae.decoder.info.inputs[0].dims[1], height // f, width // f,
                    generator=torch.Generator().manual_seed(0)).to(device)
    if tiling:
        vae.enable_tiling()
    if slicing:
        vae.enable_slicing()
    vae.check_request(height, width, batch)
    tiles = vae._tile(vae.decoder, 1 if slicing else batch, height // f, width // f) if tiling else None
    memory = PeakMemory(device)
    baseline = memory.rss() if device.type == "cpu" else 0
    started = time.perf_counter()
    with memory.measure():
        vae.decode(z)
        synchronize(device)
    return {"peak_bytes": memory.peak - baseline, "seconds": time.perf_counter() - started,
            "tile": tiles[1] if tiles else None}


def vae_memory_bench(folder: Path, batch: int = 1) -> dict:
    """The cases above, each in a child process."""
    from runtime.manifest import load_manifest

    manifest = load_manifest(folder)
    if "vae_decoder" not in manifest.components:
        raise BenchError(f"{folder} has no vae_decoder engine to measure")
    latent = manifest.components["vae_decoder"].inputs[0]
    f = manifest.data["dims"]["vae_scale_factor"]
    max_h, max_w = latent.max[2] * f, latent.max[3] * f
    cases = [("untiled at the VAE's max", max_h, max_w, batch, False, False),
             ("tiled at 2x the VAE's max side", 2 * max_h, 2 * max_w, batch, True, False)]
    if batch > 1:
        cases.append(("sliced at the VAE's max", max_h, max_w, batch, False, True))
    rows = []
    for label, h, w, b, tiling, slicing in cases:
        code = ("import json, sys; from kiln.bench.vae_memory import _child; "
                f"print(json.dumps(_child({str(folder)!r}, {h}, {w}, {b}, {tiling}, {slicing})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode:
            raise BenchError(f"{label}: the decode failed:\n{done.stderr.strip().splitlines()[-1] if done.stderr else ''}")
        rows.append({"case": label, "height": h, "width": w, "batch": b, **json.loads(done.stdout.strip().splitlines()[-1])})
    return {"folder": str(folder), "backend": manifest.backend["name"], "vae_max": [max_h, max_w], "cases": rows}


def format_vae_memory(report: dict) -> str:
    from runtime.errors import format_table

    rows = [(r["case"], f"{r['height']}x{r['width']}", r["batch"], r["tile"] or "-", f"{r['peak_bytes'] / 2**20:.1f}",
             f"{r['seconds']:.2f}") for r in report["cases"]]
    return (f"VAE decode memory, {report['backend']} (decoder engine built up to "
            f"{report['vae_max'][0]}x{report['vae_max'][1]}; each case in a fresh process)\n"
            + format_table(["case", "size", "batch", "tile", "peak MiB above loaded", "seconds"], rows))
