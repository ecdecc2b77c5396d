"""`kiln bench A B C --unet-step`: one denoiser step of each artifact's engine (e.g. fp32, fp16 and
int8 builds of one model), alternating run by run on the same inputs."""
from __future__ import annotations

import statistics
import time

from kiln.bench.measure import synchronize
from runtime.errors import KilnError


def engine_feed(info, axes: dict[str, int], seed: int = 0) -> dict:
    """Seeded inputs for an engine at these axis values, from its manifest record alone: integer
    inputs are zeros, a per-row scalar (a 1-D float, the timestep) is 500, the rest is normal noise."""
    import torch

    from runtime.shapes import eval_dims

    g = torch.Generator().manual_seed(seed)
    feed = {}
    for t in info.inputs:
        shape = eval_dims(t.dims, axes)
        dtype = getattr(torch, t.dtype)
        if not dtype.is_floating_point:
            feed[t.name] = torch.zeros(shape, dtype=dtype)
        elif len(shape) == 1:
            feed[t.name] = torch.full(shape, 500.0, dtype=dtype)
        else:
            feed[t.name] = torch.randn(shape, generator=g).to(dtype)
    return feed


def unet_step_bench(folders, options) -> dict:
    """Median, min and max seconds of one denoiser call per artifact, at UNet batch
    `options.batches[0]` (2 = one image under guidance) and the first artifact's opt size."""
    from kiln.bench.run import BenchError
    from runtime import families
    from runtime.integrity import check_artifact
    from runtime.manifest import load_manifest
    from runtime.pipeline import open_engines

    engines, labels, manifests = [], [], []
    for folder in folders:
        try:
            manifest = load_manifest(folder)
        except KilnError as exc:
            raise BenchError(f"cannot benchmark {folder}: {exc}") from exc
        manifests.append(manifest)
        family = families.get(manifest.family)
        check_artifact(manifest, [family.denoiser])  # confined and checksummed, as load_pipeline does
        engine = open_engines(manifest, [family.denoiser])[family.denoiser]
        info = manifest.data["components"][family.denoiser]
        engines.append(engine)
        labels.append((str(folder), info["precision"] + (f"/{info['int8']['recipe']}" if "int8" in info else "")))
    first = manifests[0]
    shapes, factor = first.profile["shapes"], first.data["dims"]["vae_scale_factor"]
    height, width = options.height or shapes["height"][1], options.width or shapes["width"][1]
    batch = options.batches[0]
    axes = {"unet_batch": batch, "batch": batch, "latent_height": height // factor, "latent_width": width // factor}
    feeds = [{n: x.to(e.device) for n, x in engine_feed(e.info, axes).items()} for e in engines]  # no copies timed
    for engine, feed in zip(engines, feeds):  # warm-up (and CUDA graph capture)
        engine(**feed)
    runs = options.runs
    times: list[list[float]] = [[] for _ in engines]
    for _ in range(runs):
        for k, engine in enumerate(engines):
            start = time.perf_counter()
            engine(**feeds[k])
            synchronize(engine.device)
            times[k].append(time.perf_counter() - start)
    return {"unet_batch": batch, "size": [height, width], "runs": runs, "rows": [
        {"artifact": folder, "precision": precision, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)}
        for (folder, precision), t in zip(labels, times)]}
