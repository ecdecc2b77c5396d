"""Time of one UNet step per artifact (e.g. fp32 vs fp16 vs int8 builds of one model).

    python benchmarks/unet_step.py ARTIFACT [ARTIFACT ...] [--runs 30] [--batch 2] [--size 128]

Runs the artifacts' UNet engines alternately, run by run, on the same inputs, and prints the median
and the spread. A benchmark, not a test: nothing here passes or fails.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from runtime.manifest import load_manifest
from runtime.pipeline import open_engines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image under guidance)")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default: the profile's opt)")
    args = parser.parse_args()
    engines, labels = [], []
    for folder in args.artifacts:
        manifest = load_manifest(folder)
        engines.append(open_engines(manifest, ["unet"])["unet"])
        unet = manifest.data["components"]["unet"]
        labels.append(f"{folder} [{unet['precision']}{'/' + unet['int8']['recipe'] if 'int8' in unet else ''}]")
    info = engines[0].info
    size = args.size or manifest.profile["shapes"]["height"][1]
    latent = size // manifest.data["dims"]["vae_scale_factor"]
    g = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(args.batch, info.inputs[0].dims[1], latent, latent, generator=g),
        "timestep": torch.full((args.batch,), 500.0),
        "encoder_hidden_states": torch.randn(args.batch, *info.inputs[2].dims[1:], generator=g),
    }
    per_engine = [{n: x.to(e.device) for n, x in inputs.items()} for e in engines]  # no copies in the timing
    times: list[list[float]] = [[] for _ in engines]
    for engine, x in zip(engines, per_engine):  # warm-up (and CUDA graph capture)
        engine(**x)
    for _ in range(args.runs):
        for k, engine in enumerate(engines):
            start = time.perf_counter()
            engine(**per_engine[k])
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
            times[k].append(time.perf_counter() - start)
    base = statistics.median(times[0])
    print(f"UNet step, batch {args.batch}, {size}x{size}, {args.runs} runs each, alternating")
    for label, t in zip(labels, times):
        med = statistics.median(t)
        print(f"{med * 1000:9.2f} ms  (min {min(t) * 1000:.2f}, max {max(t) * 1000:.2f})  x{med / base:.2f}  {label}")


if __name__ == "__main__":
    main()
